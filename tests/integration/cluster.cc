#include "cluster.h"

#include <algorithm>
#include <filesystem>
#include <regex>
#include <stdexcept>

#include "base/error.h"

namespace vmsync::testing {

namespace fs = std::filesystem;

std::vector<long> counterValues(const std::string& text) {
  std::vector<long> values;
  static const std::regex line(R"(^vmsync-counter (\d+)\r?$)");
  std::size_t start = 0;
  while (start < text.size()) {
    std::size_t end = text.find('\n', start);
    if (end == std::string::npos) break;  // the last line may be cut
    std::smatch m;
    std::string l = text.substr(start, end - start);
    if (std::regex_match(l, m, line)) values.push_back(std::stol(m[1]));
    start = end + 1;
  }
  return values;
}

bool consecutive(const std::vector<long>& values, std::string* why) {
  for (std::size_t i = 1; i < values.size(); ++i) {
    if (values[i] != values[i - 1] + 1) {
      if (why) *why = "value " + std::to_string(values[i]) + " follows " + std::to_string(values[i - 1]);
      return false;
    }
  }
  return true;
}

std::string missingForNetworkLab() { return NetworkLab::unavailableReason(); }

Cluster::Cluster(const std::string& dir) : dir_(dir), port_(freePort()) {
  // Every test cluster speaks TLS with enrolled devices, as a real one does.
  std::string out;
  if (run({vmsyncBinary(), "init", "--dir", identityDir(), "--server-name", "vmsync-test"}, &out) != 0)
    throw std::runtime_error("vmsync init failed: " + out);
}

std::string Cluster::credential(const std::string& device, const std::string& user) {
  const std::string path = dir_ + "/" + device + "@" + user + ".cred";
  if (!fs::exists(path)) {
    std::string out;
    if (run({vmsyncBinary(), "enroll", "--dir", identityDir(), "--user", user, "--device", device, "--out", path},
            &out) != 0)
      throw std::runtime_error("vmsync enroll failed: " + out);
  }
  return path;
}

Cluster::~Cluster() {
  devices_.clear();
  server_.reset();
  lab_.reset();  // after every process in its namespaces is gone
}

void Cluster::useNetworkLab(std::uint64_t seed) {
  lab_ = std::make_unique<NetworkLab>(static_cast<std::uint16_t>(port_), seed);
}

void Cluster::setLink(const std::string& device, const std::string& profile) {
  if (!lab_) throw std::logic_error("Cluster::setLink needs useNetworkLab()");
  lab_->addDevice(device, linkProfile(profile));
}

void Cluster::setLinkUp(const std::string& device, bool up) {
  if (!lab_) throw std::logic_error("Cluster::setLinkUp needs useNetworkLab()");
  lab_->setLinkUp(device, up);
}

void Cluster::setProfile(const std::string& device, const std::string& profile) {
  if (!lab_) throw std::logic_error("Cluster::setProfile needs useNetworkLab()");
  lab_->setProfile(device, linkProfile(profile));
}

std::string Cluster::renumber(const std::string& device) {
  if (!lab_) throw std::logic_error("Cluster::renumber needs useNetworkLab()");
  return lab_->renumber(device);
}

std::string Cluster::addressFor(const std::string& device) {
  if (!lab_) return address();
  try {
    return lab_->serverAddressFor(device);
  } catch (const Error&) {
    setLink(device, "wifi");
    return lab_->serverAddressFor(device);
  }
}

std::vector<std::string> Cluster::placed(const std::string& device, std::vector<std::string> argv) {
  if (!lab_) return argv;
  return NetworkLab::inNamespace(device.empty() ? lab_->serverNamespace() : lab_->deviceNamespace(device),
                                 std::move(argv));
}

namespace {

/// `argv` plus `--interval 1` unless `extra` sets it, plus `extra`.
void withInterval(std::vector<std::string>& argv, const std::vector<std::string>& extra) {
  if (std::find(extra.begin(), extra.end(), "--interval") == extra.end()) argv.insert(argv.end(), {"--interval", "1"});
  argv.insert(argv.end(), extra.begin(), extra.end());
}

}  // namespace

void Cluster::startServer(const std::vector<std::string>& extra) {
  std::vector<std::string> argv{vmsyncBinary(), "server", "--listen", address(), "--data", dir_ + "/server",
                                "--tls", identityDir()};
  argv.insert(argv.end(), extra.begin(), extra.end());
  server_.reset();  // a running server stops first: the new one needs its port
  server_ = std::make_unique<Process>(placed("", argv), dir_ + "/server.log");
  // Ready once it answers a listing of the user's VMs: `status()` names the
  // VM, which does not exist until a device runs it.
  waitFor([&] { return answers(); }, std::chrono::seconds(10));
}

bool Cluster::answers() {
  std::string out;
  return run(placed("", {vmsyncBinary(), "status", "--server", address(), "--credential", credential("cli")}), &out) ==
         0;
}

void Cluster::startActive(const std::string& device, const std::vector<std::string>& extra) {
  std::vector<std::string> argv{vmsyncBinary(), "active",           "--device", device,       "--state",
                                stateDir(device), "--server", addressFor(device), "--image", guestImage(),
                                "--credential",   credential(device)};
  if (std::find(extra.begin(), extra.end(), "--accel") == extra.end()) argv.insert(argv.end(), {"--accel", "tcg"});
  withInterval(argv, extra);
  devices_[device] = std::make_unique<Process>(placed(device, argv), dir_ + "/" + device + ".log");
}

void Cluster::startStandby(const std::string& device, const std::vector<std::string>& extra) {
  std::vector<std::string> argv{vmsyncBinary(),   "standby",  "--device",         device,        "--state",
                                stateDir(device), "--server", addressFor(device), "--credential", credential(device)};
  withInterval(argv, extra);
  devices_[device] = std::make_unique<Process>(placed(device, argv), dir_ + "/" + device + ".log");
}

std::optional<nlohmann::json> Cluster::status() {
  std::string out;
  if (run(placed("", {vmsyncBinary(), "status", "--vm", "vm", "--server", address(), "--credential", credential("cli"), "--json"}),
          &out) != 0)
    return std::nullopt;
  try {
    return nlohmann::json::parse(out);
  } catch (const nlohmann::json::exception&) {
    return std::nullopt;
  }
}

std::uint64_t Cluster::head() {
  auto s = status();
  return s ? (*s)["head_sequence"].get<std::uint64_t>() : 0;
}

bool Cluster::waitForHead(std::uint64_t sequence, std::chrono::seconds timeout) {
  return waitFor(
      [&] {
        auto s = status();
        if (!s) return false;
        std::uint64_t head = (*s)["head_sequence"];
        if (head < sequence) return false;
        for (const auto& d : (*s)["devices"])
          if (d["state"] == "stale") return false;
        return true;
      },
      timeout);
}

nlohmann::json Cluster::deviceStatus(const std::string& device) {
  auto s = status();
  if (!s) return nullptr;
  for (const auto& d : (*s)["devices"])
    if (d["device"] == device) return d;
  return nullptr;
}

bool Cluster::waitForDevice(const std::string& device, std::uint64_t sequence, std::chrono::seconds timeout) {
  return waitFor(
      [&] {
        auto d = deviceStatus(device);
        return !d.is_null() && d["state"] != "offline" && d["applied_sequence"] >= sequence;
      },
      timeout);
}

int Cluster::switchTo(const std::string& target, nlohmann::json* report, std::string* output, bool force) {
  std::string out, progress;
  std::vector<std::string> argv{vmsyncBinary(), "switch", "--server", address(), "--credential", credential("cli"),
                                "--to",         target,   "--json"};
  if (force) argv.push_back("--force");
  int rc = run(placed("", argv), &out, &progress);
  if (output) *output = progress + out;
  if (rc == 0 && report) {
    try {
      *report = nlohmann::json::parse(out);
      (*report)["progress"] = progress;
    } catch (const nlohmann::json::exception&) {
      return -1;
    }
  }
  return rc;
}

void Cluster::switchAndWatchTheCounter(const std::string& from, const std::string& to,
                                       std::string* fromSerial) {
  nlohmann::json report;
  std::string output;
  ASSERT_EQ(switchTo(to, &report, &output), 0) << output << logOf(from) << logOf(to);
  *fromSerial = readFile(serialLog(from));
  ASSERT_TRUE(waitFor([&] { return counterValues(readFile(serialLog(to))).size() >= 3; },
                      std::chrono::seconds(60)))
      << logOf(to);
  std::string why;
  EXPECT_TRUE(consecutive(counterValues(*fromSerial + readFile(serialLog(to))), &why)) << why;
}

std::string Cluster::logOf(const std::string& device) const {
  std::string text = readFile(dir_ + "/" + device + ".log");
  if (text.size() > 6000) text = "..." + text.substr(text.size() - 6000);
  return "---- " + device + " log ----\n" + text;
}

}  // namespace vmsync::testing
