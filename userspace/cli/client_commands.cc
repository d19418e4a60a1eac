#include "cli/client_commands.h"

#include <fmt/format.h>

#include <cstdio>
#include <functional>
#include <kj/async-io.h>
#include <nlohmann/json.hpp>

#include "base/error.h"
#include "transport/rpc_util.h"
#include "transport/secure_channel.h"
#include "vmsync.capnp.h"

namespace vmsync {

int printJson(const nlohmann::json& j) {
  std::puts(j.dump(2).c_str());
  return 0;
}

namespace {

const char* stateName(vmsync::wire::DeviceState state) {
  switch (state) {
    case vmsync::wire::DeviceState::ONLINE: return "online";
    case vmsync::wire::DeviceState::OFFLINE: return "offline";
    case vmsync::wire::DeviceState::STALE: return "stale";
  }
  return "unknown";
}


/// Connects to the server, saying which one could not be reached.
kj::Own<vmsync::RpcConnection> connectOrExplain(kj::AsyncIoContext& io, vmsync::ClientTransport& transport,
                                                const std::string& server) {
  try {
    return transport.connect(io, server).wait(io.waitScope);
  } catch (const kj::Exception& e) {
    throw vmsync::Error("cannot reach the sync server at " + server + ": " + vmsync::describe(e));
  }
}

/// Waits for `promise`; a plain-TCP client whose server hangs up, or a device
/// whose credential the server refuses, is told the likely reason.
template <typename T>
T waitExplained(kj::Promise<T>&& promise, kj::WaitScope& scope, const vmsync::ClientTransport& transport,
                const std::string& server) {
  try {
    return promise.wait(scope);
  } catch (const kj::Exception& e) {
    if (transport.secure()) throw vmsync::Error(transport.explain(e));
    if (e.getType() != kj::Exception::Type::DISCONNECTED) throw;
    throw vmsync::Error("the sync server at " + server + " closed the connection (" + vmsync::describe(e) +
                        "); if it runs with --tls, connect with --credential FILE");
  }
}

double ms(std::uint64_t ns) { return static_cast<double>(ns) / 1e6; }

/// `vmsync status` without --vm: one line per VM of the user.
int listVms(vmsync::wire::SyncServer::Client& client, kj::AsyncIoContext& io, const vmsync::ClientTransport& transport,
            const ClientOptions& options, bool json) {
  auto response = waitExplained(client.listVmsRequest().send(), io.waitScope, transport, options.server);
  auto vms = response.getVms();
  if (json) {
    nlohmann::json j{{"vms", nlohmann::json::array()}};
    for (auto vm : vms)
      j["vms"].push_back({{"name", std::string(vm.getName())},
                          {"user", std::string(vm.getUser())},
                          {"head_sequence", vm.getHeadSequence()},
                          {"active_device", std::string(vm.getActiveDevice())},
                          {"parked", vm.getParked()},
                          {"chain_bytes", vm.getChainBytes()},
                          {"devices", vm.getDevices()}});
    return printJson(j);
  }
  if (vms.size() == 0) {
    std::printf("no VMs on this server yet: `vmsync active --vm NAME` creates one\n");
    return 0;
  }
  std::printf("%-24s %-8s %-16s %-8s %-10s %s\n", "VM", "HEAD", "ACTIVE", "STATE", "STORED", "DEVICES");
  for (auto vm : vms) {
    const std::string name = vm.getUser().size() ? fmt::format("{}/{}", vm.getUser().cStr(), vm.getName().cStr())
                                                 : std::string(vm.getName());
    std::printf("%-24s %-8llu %-16s %-8s %-10s %u\n", name.c_str(),
                static_cast<unsigned long long>(vm.getHeadSequence()),
                vm.getActiveDevice().size() ? vm.getActiveDevice().cStr() : "-",
                vm.getActiveDevice().size() ? "running" : vm.getParked() ? "parked" : "-",
                fmt::format("{:.1f} MiB", vm.getChainBytes() / 1048576.0).c_str(), vm.getDevices());
  }
  std::printf("`vmsync status --vm NAME` shows a VM's devices\n");
  return 0;
}

}  // namespace

int runStatus(const ClientOptions& options, bool json) {
  auto transport = vmsync::clientTransport(options.credential, options.insecure);
  auto io = kj::setupAsyncIo();
  auto connection = connectOrExplain(io, transport, options.server);
  auto client = connection->bootstrap().castAs<vmsync::wire::SyncServer>();
  if (options.vm.empty()) return listVms(client, io, transport, options, json);
  auto request = client.statusRequest();
  request.setVm(options.vm);
  auto response = waitExplained(request.send(), io.waitScope, transport, options.server);
  auto status = response.getStatus();
  if (json) {
    nlohmann::json j{{"vm_id", std::string(status.getVmId())},
                     {"user", std::string(status.getUser())},
                     {"head_sequence", status.getHeadSequence()},
                     {"epoch", status.getEpoch()},
                     {"active_device", std::string(status.getActiveDevice())},
                     {"stored_bytes", status.getStoredBytes()},
                     {"parked", status.getParked()},
                     {"parked_by", std::string(status.getParkedBy())},
                     {"resumable_point", status.getResumablePoint()},
                     {"resumable_point_age_ms", ms(status.getResumablePointAgeNs())},
                     {"active_silent_ms", ms(status.getActiveSilentNs())},
                     {"abandoned", status.getAbandoned()},
                     {"devices", nlohmann::json::array()}};
    for (auto d : status.getDevices())
      j["devices"].push_back({{"device", std::string(d.getDeviceId())},
                              {"state", stateName(d.getState())},
                              {"applied_sequence", d.getAppliedSequence()},
                              {"active", d.getActive()}});
    return printJson(j);
  }
  std::printf("VM %s: head checkpoint %llu, lease epoch %llu, active device %s\n",
              status.getVmId().size() ? status.getVmId().cStr() : "(none yet)",
              static_cast<unsigned long long>(status.getHeadSequence()),
              static_cast<unsigned long long>(status.getEpoch()),
              status.getActiveDevice().size() ? status.getActiveDevice().cStr() : "(none)");
  if (status.getResumablePoint() != 0)
    std::printf("newest resumable point: checkpoint %llu, %.1f s old\n",
                static_cast<unsigned long long>(status.getResumablePoint()), status.getResumablePointAgeNs() / 1e9);
  if (status.getParked())
    std::printf("parked by %s at checkpoint %llu: `vmsync switch --to DEVICE` resumes it there\n",
                status.getParkedBy().cStr(), static_cast<unsigned long long>(status.getHeadSequence()));
  std::printf("%-16s %-8s %-8s %s\n", "DEVICE", "STATE", "APPLIED", "ROLE");
  for (auto d : status.getDevices())
    std::printf("%-16s %-8s %-8llu %s\n", d.getDeviceId().cStr(), stateName(d.getState()),
                static_cast<unsigned long long>(d.getAppliedSequence()), d.getActive() ? "active" : "standby");
  return 0;
}

int runSwitch(const ClientOptions& options, const std::string& target, bool force, bool json) {
  auto transport = vmsync::clientTransport(options.credential, options.insecure);
  auto io = kj::setupAsyncIo();
  auto connection = connectOrExplain(io, transport, options.server);
  auto client = connection->bootstrap().castAs<vmsync::wire::SyncServer>();
  auto request = client.switchToRequest();
  request.setTarget(target);
  request.setForce(force);
  request.setVm(options.vm);
  // While the switch runs, say how far a stale target is from the head.
  auto& timer = io.provider->getTimer();
  std::string lastLine;
  std::function<kj::Promise<void>()> watch = [&]() -> kj::Promise<void> {
    return timer.afterDelay(500 * kj::MILLISECONDS).then([&]() {
      auto statusRequest = client.statusRequest();
      statusRequest.setVm(options.vm);
      return statusRequest.send().then([&](capnp::Response<vmsync::wire::SyncServer::StatusResults> s) {
        auto status = s.getStatus();
        for (auto d : status.getDevices()) {
          if (d.getDeviceId() != target) continue;
          std::string line;
          if (d.getSendingSequence() != 0)
            line = fmt::format("catching up {}: at checkpoint {}, receiving up to {} ({:.1f} MB, {:.1f} s so far)",
                               target, d.getAppliedSequence(), d.getSendingSequence(), d.getSendingBytes() / 1e6,
                               d.getSendingForNs() / 1e9);
          else if (d.getAppliedSequence() < status.getHeadSequence())
            line = fmt::format("catching up {}: at checkpoint {} of {}", target, d.getAppliedSequence(),
                               status.getHeadSequence());
          if (!line.empty() && line != lastLine) std::fprintf(stderr, "%s\n", line.c_str());
          lastLine = line;
        }
        return watch();
      });
    });
  };
  auto response = waitExplained(
      request.send().exclusiveJoin(watch().then([]() -> capnp::Response<vmsync::wire::SyncServer::SwitchToResults> {
        KJ_UNREACHABLE;
      })),
      io.waitScope, transport, options.server);
  auto r = response.getReport();
  if (json) {
    nlohmann::json j{{"from", std::string(r.getFrom())},      {"to", std::string(r.getTo())},
                     {"final_sequence", r.getFinalSequence()}, {"final_bytes", r.getFinalBytes()},
                     {"epoch", r.getEpoch()},                  {"pause_ms", ms(r.getPauseNs())},
                     {"final_harvest_ms", ms(r.getFinalHarvestNs())},
                     {"device_state_save_ms", ms(r.getDeviceStateSaveNs())},
                     {"device_state_bytes", r.getDeviceStateBytes()},
                     {"device_state_wire_bytes", r.getDeviceStateWireBytes()},
                     {"transfer_ms", ms(r.getTransferNs())},   {"apply_ms", ms(r.getApplyNs())},
                     {"device_state_load_ms", ms(r.getDeviceStateLoadNs())},
                     {"resume_ms", ms(r.getResumeNs())},       {"total_ms", ms(r.getTotalNs())},
                     {"catch_up_ms", ms(r.getCatchUpNs())},    {"catch_up_bytes", r.getCatchUpBytes()},
                     {"from_parked", r.getFromParked()},
                     {"forced", r.getForced()},
                     {"lost_ms", ms(r.getLostNs())},
                     {"abandoned_checkpoints", r.getAbandonedCheckpoints()},
                     {"page_source", std::string(r.getPageSource())},
                     {"final_ram_full_compare", r.getFinalRamFullCompare()},
                     {"final_ram_units", r.getFinalRamUnits()},
                     {"final_ram_missed", r.getFinalRamMissed()}};
    return printJson(j);
  }
  if (r.getForced()) {
    std::printf("failed over from %s to %s: resumed from resumable point %llu, lease epoch %llu\n", r.getFrom().cStr(),
                r.getTo().cStr(), static_cast<unsigned long long>(r.getFinalSequence()),
                static_cast<unsigned long long>(r.getEpoch()));
    std::printf("  guest time lost    %8.1f s  (the age of that point; %llu later checkpoints abandoned)\n",
                r.getLostNs() / 1e9, static_cast<unsigned long long>(r.getAbandonedCheckpoints()));
    std::printf("  catch-up           %8.1f ms  (%llu bytes)\n", ms(r.getCatchUpNs()),
                static_cast<unsigned long long>(r.getCatchUpBytes()));
    std::printf("  total              %8.1f ms\n", ms(r.getTotalNs()));
    return 0;
  }
  if (r.getFromParked()) {
    std::printf("resumed on %s the VM %s parked at checkpoint %llu, lease epoch %llu\n", r.getTo().cStr(),
                r.getFrom().cStr(), static_cast<unsigned long long>(r.getFinalSequence()),
                static_cast<unsigned long long>(r.getEpoch()));
    if (r.getCatchUpNs() != 0)
      std::printf("  catch-up first     %8.1f ms  (%llu bytes)\n", ms(r.getCatchUpNs()),
                  static_cast<unsigned long long>(r.getCatchUpBytes()));
    std::printf("  device-state load  %8.1f ms\n", ms(r.getDeviceStateLoadNs()));
    std::printf("  resume             %8.1f ms\n", ms(r.getResumeNs()));
    std::printf("  total              %8.1f ms\n", ms(r.getTotalNs()));
    return 0;
  }
  std::printf("switched %s -> %s: final checkpoint %llu (%llu bytes), lease epoch %llu\n", r.getFrom().cStr(),
              r.getTo().cStr(), static_cast<unsigned long long>(r.getFinalSequence()),
              static_cast<unsigned long long>(r.getFinalBytes()), static_cast<unsigned long long>(r.getEpoch()));
  if (r.getCatchUpNs() != 0)
    std::printf("  catch-up first     %8.1f ms  (%llu bytes, while the VM ran on %s)\n", ms(r.getCatchUpNs()),
                static_cast<unsigned long long>(r.getCatchUpBytes()), r.getFrom().cStr());
  std::printf("  pause              %8.1f ms\n", ms(r.getPauseNs()));
  std::printf("  final harvest      %8.1f ms  (%llu RAM units; %s)\n", ms(r.getFinalHarvestNs()),
              static_cast<unsigned long long>(r.getFinalRamUnits()),
              r.getFinalRamFullCompare()
                  ? fmt::format("every unit compared, {} not reported by the {} source",
                                r.getFinalRamMissed(), r.getPageSource().cStr())
                        .c_str()
                  : fmt::format("the {} source's list", r.getPageSource().cStr()).c_str());
  std::printf("  device-state save  %8.1f ms  (%llu bytes, %llu on the way)\n", ms(r.getDeviceStateSaveNs()),
              static_cast<unsigned long long>(r.getDeviceStateBytes()),
              static_cast<unsigned long long>(r.getDeviceStateWireBytes()));
  std::printf("  transfer           %8.1f ms\n", ms(r.getTransferNs()));
  std::printf("  apply              %8.1f ms\n", ms(r.getApplyNs()));
  std::printf("  device-state load  %8.1f ms\n", ms(r.getDeviceStateLoadNs()));
  std::printf("  resume             %8.1f ms\n", ms(r.getResumeNs()));
  std::printf("  total              %8.1f ms\n", ms(r.getTotalNs()));
  return 0;
}

int runStop(const ClientOptions& options, bool json) {
  auto transport = vmsync::clientTransport(options.credential, options.insecure);
  auto io = kj::setupAsyncIo();
  auto connection = connectOrExplain(io, transport, options.server);
  auto client = connection->bootstrap().castAs<vmsync::wire::SyncServer>();
  auto request = client.stopRequest();
  request.setVm(options.vm);
  auto response = waitExplained(request.send(), io.waitScope, transport, options.server);
  auto r = response.getReport();
  if (json) {
    nlohmann::json j{{"parked_by", std::string(r.getDevice())},
                     {"final_sequence", r.getFinalSequence()},
                     {"final_bytes", r.getFinalBytes()}};
    return printJson(j);
  }
  std::printf("VM parked by %s at checkpoint %llu (final checkpoint %llu bytes); its daemon exits. "
              "`vmsync switch --to DEVICE` or `vmsync active` on %s resumes it\n",
              r.getDevice().cStr(), static_cast<unsigned long long>(r.getFinalSequence()),
              static_cast<unsigned long long>(r.getFinalBytes()), r.getDevice().cStr());
  return 0;
}

}  // namespace vmsync
