// The server's Prometheus metrics, scraped over HTTP from the endpoint as a
// Prometheus server would: before and after pushes, a standby's applies, a
// standby that stops answering and a refusal, the values move with what
// happened.
#include <gtest/gtest.h>
#include <kj/async.h>

#include <chrono>
#include <cmath>
#include <string>
#include <thread>

#include "base/error.h"
#include "base/metrics.h"
#include "metrics_scrape.h"
#include "server_metrics.h"
#include "sync_server.h"
#include "test_checkpoint.h"
#include "test_env.h"

namespace vmsync {
namespace {

using testing::TempDir;
using testing::metricSample;
using testing::scrapeMetrics;

/// A standby that applies every checkpoint at once.
class QuickStandby final : public wire::DevicePeer::Server {
 protected:
  kj::Promise<void> apply(ApplyContext context) override {
    context.getResults().setAppliedSequence(context.getParams().getCheckpoint().getSequence());
    return kj::READY_NOW;
  }
};

/// A standby that never answers an apply.
class SilentStandby final : public wire::DevicePeer::Server {
 protected:
  kj::Promise<void> apply(ApplyContext) override { return kj::NEVER_DONE; }
};

TEST(ServerMetrics, ScrapedOverHttpTheyMoveWithPushesAppliesLagAndRefusals) {
  kj::EventLoop loop;
  kj::WaitScope waitScope(loop);
  TempDir dir;
  auto metrics = std::make_shared<ServerMetrics>();
  MetricsEndpoint endpoint("127.0.0.1:0");
  endpoint.serve(metrics);
  SyncServer server(dir.path());
  server.setIdentity("alice", "vm");
  server.setMetrics(metrics);
  const std::string vm = R"(vm="alice/vm")";

  // Nothing happened yet: no push counted.
  std::string before = scrapeMetrics(endpoint.port());
  EXPECT_TRUE(std::isnan(metricSample(before, "vmsync_server_checkpoints_stored_total", {vm}))) << before;

  const std::uint64_t epoch = server.acquireLease("A");
  auto full = testCheckpoint(1, epoch);
  ASSERT_EQ(server.push("A", full->getRoot<wire::Checkpoint>().asReader()), 1u);
  server.registerDevice("B", kj::heap<QuickStandby>(), 0, 0, false).wait(waitScope);
  loop.run();

  std::string first = scrapeMetrics(endpoint.port());
  EXPECT_EQ(metricSample(first, "vmsync_server_checkpoints_stored_total", {vm}), 1) << first;
  EXPECT_GT(metricSample(first, "vmsync_server_stored_bytes_total", {vm}), 4096.0) << first;
  EXPECT_EQ(metricSample(first, "vmsync_server_checkpoints_forwarded_total", {vm}), 1) << first;
  EXPECT_EQ(metricSample(first, "vmsync_server_forward_seconds_count"), 1) << first;
  EXPECT_EQ(metricSample(first, "vmsync_server_device_lag_checkpoints", {vm, R"(device="B")"}), 0) << first;
  EXPECT_EQ(metricSample(first, "vmsync_server_device_lag_seconds", {vm, R"(device="B")"}), 0) << first;
  EXPECT_EQ(metricSample(first, "vmsync_server_lease_epoch", {vm}), static_cast<double>(epoch)) << first;

  // A standby that stops answering falls behind, and the seconds it has
  // been behind grow between two scrapes.
  server.registerDevice("C", kj::heap<SilentStandby>(), 0, 0, false).wait(waitScope);
  for (std::uint64_t s = 2; s <= 3; ++s) {
    auto next = testCheckpoint(s, epoch);
    ASSERT_EQ(server.pushAsync("A", next->getRoot<wire::Checkpoint>().asReader()).wait(waitScope), s);
    loop.run();
  }
  std::string second = scrapeMetrics(endpoint.port());
  EXPECT_EQ(metricSample(second, "vmsync_server_checkpoints_stored_total", {vm}), 3) << second;
  EXPECT_EQ(metricSample(second, "vmsync_server_push_seconds_count"), 2) << second;
  EXPECT_EQ(metricSample(second, "vmsync_server_checkpoints_forwarded_total", {vm}), 3) << second;
  EXPECT_EQ(metricSample(second, "vmsync_server_device_lag_checkpoints", {vm, R"(device="B")"}), 0) << second;
  EXPECT_EQ(metricSample(second, "vmsync_server_device_lag_checkpoints", {vm, R"(device="C")"}), 3) << second;
  const double behind = metricSample(second, "vmsync_server_device_lag_seconds", {vm, R"(device="C")"});
  EXPECT_GT(behind, 0) << second;
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  std::string third = scrapeMetrics(endpoint.port());
  EXPECT_GE(metricSample(third, "vmsync_server_device_lag_seconds", {vm, R"(device="C")"}), behind + 0.2) << third;

  // A refusal is counted by its action.
  EXPECT_TRUE(std::isnan(metricSample(third, "vmsync_server_refused_total", {R"(action="status")"}))) << third;
  PeerIdentity mallory;
  mallory.authenticated = true;
  mallory.user = "mallory";
  mallory.device = "laptop";
  EXPECT_THROW(server.refuse(mallory, "status", "mallory may not see VM alice/vm"), Error);
  std::string fourth = scrapeMetrics(endpoint.port());
  EXPECT_EQ(metricSample(fourth, "vmsync_server_refused_total", {R"(action="status")"}), 1) << fourth;
}

TEST(ServerMetrics, AnAddressWithoutAPortIsRefusedByName) {
  try {
    MetricsEndpoint endpoint("localhost");
    FAIL() << "an address without a port was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--metrics-listen localhost: give host:port"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace vmsync
