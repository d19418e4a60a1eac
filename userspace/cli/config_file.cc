#include "cli/config_file.h"

#include <cstdlib>
#include <memory>
#include <set>

namespace vmsync {
namespace {

/// `init`, `enroll` and `revoke` name the user and device they act on: a
/// device's own `device = "phone"` must not turn `vmsync revoke --user me`
/// (every device of the user) into a revocation of the phone alone. They
/// take settings from their own sections only.
bool administersIdentities(const std::vector<std::string>& path) {
  return path.size() == 1 && (path[0] == "init" || path[0] == "enroll" || path[0] == "revoke");
}

/// CLI11 reads TOML sections as the options of the subcommand they name; this
/// reader adds the top-level keys to every command that has such an option.
class SharedKeysConfig final : public CLI::ConfigTOML {
 public:
  explicit SharedKeysConfig(const CLI::App& app) : app_(app) {}

  std::vector<CLI::ConfigItem> from_config(std::istream& input) const override {
    const auto items = CLI::ConfigTOML::from_config(input);
    // Keys a section sets itself: the top's value does not override them.
    std::set<std::pair<std::vector<std::string>, std::string>> inSections;
    for (const auto& item : items)
      if (!item.parents.empty()) inSections.insert({item.parents, item.name});

    std::vector<CLI::ConfigItem> out;
    for (const auto& item : items) {
      if (item.name == "++" || item.name == "--") {  // section markers
        out.push_back(item);
        continue;
      }
      if (!item.parents.empty()) {
        const CLI::App* command = find(item.parents);
        if (command == nullptr)
          throw CLI::ConfigError("config file: unknown section [" + CLI::detail::join(item.parents, ".") +
                                 "]: no such command");
        if (!command->get_option_no_throw("--" + item.name))
          throw CLI::ConfigError("config file: `vmsync " + CLI::detail::join(item.parents, " ") +
                                 "` has no option --" + item.name + " (key '" + item.name + "' in [" +
                                 CLI::detail::join(item.parents, ".") + "])");
        if (onCommandLine(item.parents)) out.push_back(item);
        continue;
      }
      bool used = false;
      if (app_.get_option_no_throw("--" + item.name)) {
        out.push_back(item);
        used = true;
      }
      forEachCommand(app_, {}, [&](const CLI::App& command, const std::vector<std::string>& path) {
        if (!command.get_option_no_throw("--" + item.name)) return;
        used = true;
        if (inSections.count({path, item.name}) || administersIdentities(path) || !onCommandLine(path)) return;
        auto copy = item;
        copy.parents = path;
        out.push_back(copy);
      });
      if (!used) throw CLI::ConfigError("config file: unknown key '" + item.name + "': no command has --" + item.name);
    }
    return out;
  }

 private:
  template <typename F>
  static void forEachCommand(const CLI::App& app, std::vector<std::string> path, const F& visit) {
    for (const CLI::App* sub : app.get_subcommands({})) {
      auto subPath = path;
      subPath.push_back(sub->get_name());
      visit(*sub, subPath);
      forEachCommand(*sub, subPath, visit);
    }
  }

  /// Whether the command line named the command at `path`. Only its
  /// settings are given: commands may share the variables their options
  /// fill (status, switch and stop do), so another command's section must
  /// not reach them. (CLI11 reads the file after the command line.)
  bool onCommandLine(const std::vector<std::string>& path) const {
    const CLI::App* at = &app_;
    for (const auto& name : path) {
      const CLI::App* next = nullptr;
      for (const CLI::App* sub : at->get_subcommands({}))
        if (sub->get_name() == name) next = sub;
      if (next == nullptr || !next->parsed()) return false;
      at = next;
    }
    return true;
  }

  const CLI::App* find(const std::vector<std::string>& path) const {
    const CLI::App* at = &app_;
    for (const auto& name : path) {
      const CLI::App* next = nullptr;
      for (const CLI::App* sub : at->get_subcommands({}))
        if (sub->get_name() == name) next = sub;
      if (next == nullptr) return nullptr;
      at = next;
    }
    return at;
  }

  const CLI::App& app_;
};

}  // namespace

std::string defaultConfigPath() {
  const char* fromEnvironment = std::getenv("VMSYNC_CONFIG");
  if (fromEnvironment != nullptr && *fromEnvironment != '\0') return fromEnvironment;
  return "/etc/vmsync/vmsync.toml";
}

void addConfigFile(CLI::App& app) {
  app.config_formatter(std::make_shared<SharedKeysConfig>(app));
  const std::string path = defaultConfigPath();
  // A file named by --config or $VMSYNC_CONFIG must exist; the system-wide
  // default is read only where it does.
  const bool named = std::getenv("VMSYNC_CONFIG") != nullptr && *std::getenv("VMSYNC_CONFIG") != '\0';
  app.set_config("--config", path,
                 "settings file (TOML): top-level keys apply to every command with that option, [COMMAND] "
                 "sections to one (default $VMSYNC_CONFIG, else /etc/vmsync/vmsync.toml if it exists)",
                 named);
}

}  // namespace vmsync
