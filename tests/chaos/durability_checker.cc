#include "durability_checker.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <filesystem>
#include <map>
#include <regex>
#include <vector>

#include "base/error.h"
#include "chain_image.h"
#include "chaos_schedule.h"
#include "checkpoint/checkpoint_identity.h"
#include "harvest/unit_hashes.h"
#include "test_env.h"

namespace vmsync::testing {

namespace fs = std::filesystem;

namespace {

/// What a device logged as acknowledged by the server.
struct Ack {
  std::string device;
  std::string digest;
};

/// Every acknowledgement in the devices' logs, by (sequence, lease epoch).
/// Two different checkpoints acknowledged under one identity go to `clashes`.
std::map<std::pair<std::uint64_t, std::uint64_t>, Ack> acknowledgements(const std::string& dir,
                                                                        std::vector<std::string>* clashes) {
  // A device ends each acknowledgement's line with the checkpoint's identity:
  // "A: checkpoint 12 (incremental) stored: ..., lease epoch 3, checkpoint digest <hex>",
  // "A: checkpoint 14 (resumable point) stored: ...", "A: final checkpoint 13 stored (...), ...".
  static const std::regex line(
      R"((\S+): (?:final )?checkpoint (\d+) [^\n]*, lease epoch (\d+), checkpoint digest ([0-9a-f]{32}))");
  std::map<std::pair<std::uint64_t, std::uint64_t>, Ack> acks;
  for (const auto& device : kDevices) {
    const std::string log = readFile(dir + "/" + device + ".log");
    // Every line with an identity must parse: a change of wording fails the
    // run instead of leaving acknowledgements unchecked.
    std::size_t withIdentity = 0, parsed = 0;
    for (std::size_t at = log.find(", checkpoint digest "); at != std::string::npos;
         at = log.find(", checkpoint digest ", at + 1))
      ++withIdentity;
    for (std::sregex_iterator it(log.begin(), log.end(), line), end; it != end; ++it) ++parsed;
    if (parsed != withIdentity)
      clashes->push_back(fmt::format("{}'s log has {} acknowledgements but {} parse: the checker is out of date",
                                     device, withIdentity, parsed));
    for (std::sregex_iterator it(log.begin(), log.end(), line), end; it != end; ++it) {
      const auto key = std::make_pair(std::stoull((*it)[2]), std::stoull((*it)[3]));
      Ack ack{(*it)[1], (*it)[4]};
      auto [at, fresh] = acks.emplace(key, ack);
      if (!fresh && at->second.digest != ack.digest)
        clashes->push_back(fmt::format("checkpoint {} (epoch {}) was acknowledged twice with different contents "
                                       "(to {} and {})", key.first, key.second, at->second.device, ack.device));
    }
  }
  return acks;
}

/// A stored checkpoint, as the checker reads it from the data directory.
struct Stored {
  std::uint64_t epoch = 0;
  std::string digest;
};

/// Checks every acknowledgement against the server's data directory.
}  // namespace

void checkDurability(const std::string& dir, ChaosResult& result, const std::string& when) {
  std::vector<std::string> clashes;
  const auto acks = acknowledgements(dir, &clashes);
  for (const auto& c : clashes) result.failures.push_back(when + ": " + c);
  const std::string chain = dir + "/server/vms/owner/vm/checkpoints";
  // A fold may prune files while they are read: read again when one vanished.
  for (int attempt = 0;; ++attempt) {
    std::map<std::uint64_t, std::string> files;
    std::uint64_t base = 0;
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(chain, ec)) {
      const std::string name = e.path().filename().string();
      const auto dot = name.find('.');
      if (dot == std::string::npos || name.find_first_not_of("0123456789") != dot) continue;
      const std::uint64_t seq = std::stoull(name.substr(0, dot));
      if (name.substr(dot) == ".ckpt") files[seq] = e.path().string();
      if (name.substr(dot) == ".base") base = std::max(base, seq);
    }
    std::map<std::uint64_t, Stored> stored;
    bool vanished = false;
    for (const auto& [seq, path] : files) {
      if (!fs::exists(path)) {
        vanished = true;
        break;
      }
      try {
        auto record = readCheckpointFile(path, "check a checkpoint");
        stored[seq] = Stored{record->reader().getEpoch(), toHex(checkpointDigest(record->reader()))};
      } catch (const Error& e) {
        if (!fs::exists(path)) {
          vanished = true;
          break;
        }
        stored[seq] = Stored{0, std::string("unreadable: ") + e.what()};
      }
    }
    if (vanished && attempt < 5) continue;
    std::vector<std::pair<std::uint64_t, std::uint64_t>> failovers;  // (point, epoch)
    try {
      auto state = nlohmann::json::parse(readFile(dir + "/server/vms/owner/vm/state.json"));
      for (const auto& f : state.value("failovers", nlohmann::json::array()))
        failovers.emplace_back(f.at(0).get<std::uint64_t>(), f.at(1).get<std::uint64_t>());
    } catch (const nlohmann::json::exception&) {
      // no state yet: no failover either
    }
    // What failovers set aside: "epoch-E-SEQUENCE.ckpt" under abandoned/, by
    // (sequence, the checkpoint's own epoch).
    std::map<std::pair<std::uint64_t, std::uint64_t>, std::string> kept;
    for (const auto& e : fs::directory_iterator(dir + "/server/vms/owner/vm/abandoned", ec)) {
      static const std::regex name(R"(epoch-\d+-(\d+)\.ckpt)");
      std::smatch m;
      const std::string file = e.path().filename().string();
      if (!std::regex_match(file, m, name)) continue;
      try {
        auto record = readCheckpointFile(e.path().string(), "check an abandoned checkpoint");
        kept[{std::stoull(m[1]), record->reader().getEpoch()}] = toHex(checkpointDigest(record->reader()));
      } catch (const Error& error) {
        kept[{std::stoull(m[1]), 0}] = std::string("unreadable: ") + error.what();
      }
    }
    result.acknowledged = acks.size();
    result.checkedByDigest = result.folded = result.abandoned = 0;
    std::uint64_t lost = 0;
    for (const auto& [key, ack] : acks) {
      const auto [seq, epoch] = key;
      const bool abandoned = std::any_of(failovers.begin(), failovers.end(),
                                         [&](const auto& f) { return seq > f.first && epoch < f.second; });
      auto it = stored.find(seq);
      auto set = kept.find(key);
      if (abandoned && set != kept.end() && set->second == ack.digest) {
        ++result.abandoned;  // not resumed, but not deleted either
      } else if (abandoned) {
        ++lost;
        result.failures.push_back(fmt::format(
            "{}: checkpoint {} (epoch {}, digest {}) acknowledged to {} was abandoned by a failover but is {}", when,
            seq, epoch, ack.digest, ack.device,
            set == kept.end() ? std::string("not kept under abandoned/")
                              : "kept under abandoned/ with other contents (" + set->second + ")"));
      } else if (it != stored.end() && it->second.epoch == epoch && it->second.digest == ack.digest) {
        ++result.checkedByDigest;
      } else if (it == stored.end() && seq <= base) {
        ++result.folded;
      } else {
        ++lost;
        result.failures.push_back(fmt::format(
            "{}: checkpoint {} (epoch {}, digest {}) acknowledged to {} is {}", when, seq, epoch, ack.digest,
            ack.device,
            it == stored.end() ? fmt::format("not in the store (base {}, files up to {})", base,
                                             files.empty() ? 0 : files.rbegin()->first)
                               : fmt::format("stored with other contents (epoch {}, {})", it->second.epoch,
                                             it->second.digest)));
      }
    }
    result.lost = lost;
    return;
  }
}

}  // namespace vmsync::testing
