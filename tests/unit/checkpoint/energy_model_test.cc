// The energy model against cases computed by hand. The figures are the
// models' own (Huang et al., MobiSys 2012); each expected value is worked out
// in the comment above it.
#include "checkpoint/energy_model.h"

#include <gtest/gtest.h>

#include "base/error.h"

namespace vmsync {
namespace {

// lte's link in the lab: 5 Mbit/s up, 12 down. 625,000 bytes up is 5 Mbit:
// one second on the uplink, at 5 Mbit/s.
constexpr LinkRates kLte{.upMbit = 5, .downMbit = 12};
constexpr std::uint64_t kOneSecondUp = 625'000;

// lte, transfer at 5 Mbit/s up: P = 0.43839 * 5 + 1.28804 = 3.47999 W, for 1 s.
constexpr double kLteTransfer = 3.47999;
// lte promotion: 0.2601 s * 1.2107 W = 0.31490307 J.
constexpr double kLtePromotion = 0.31490307;
// lte tail: 11.576 s * 1.060 W = 12.27056 J.
constexpr double kLteTail = 12.27056;

TEST(EnergyModel, NothingSentCostsNothing) {
  for (const auto& radio : radioPowerModels()) {
    const EnergyBreakdown e = deviceEnergy(radio, kLte, {});
    EXPECT_EQ(e.total(), 0.0) << radio.name;
    EXPECT_EQ(e.promotions, 0) << radio.name;
  }
}

TEST(EnergyModel, OneTransferPaysPromotionTransferAndTheWholeTail) {
  const EnergyBreakdown e = deviceEnergy(radioPowerModel("lte"), kLte, {{.startSeconds = 0, .bytesUp = kOneSecondUp}});
  EXPECT_EQ(e.promotions, 1);
  EXPECT_NEAR(e.promotion, kLtePromotion, 1e-9);
  EXPECT_NEAR(e.transfer, kLteTransfer, 1e-9);
  EXPECT_NEAR(e.tail, kLteTail, 1e-9);
  EXPECT_NEAR(e.busySeconds, 1.0, 1e-12);
  // 0.31490307 + 3.47999 + 12.27056 = 16.06545307 J.
  EXPECT_NEAR(e.radio(), 16.06545307, 1e-9);
}

TEST(EnergyModel, TwoTransfersInsideOneTailShareIt) {
  // First: promotion [0, 0.2601], data [0.2601, 1.2601], tail from 1.2601.
  // Second at 5 s: 3.7399 s into the tail, no promotion; that part of the
  // tail is 3.7399 * 1.060 = 3.964294 J. Then its data and a whole tail.
  // 0.31490307 + 2 * 3.47999 + 3.964294 + 12.27056 = 23.50973707 J.
  const EnergyBreakdown e = deviceEnergy(radioPowerModel("lte"), kLte,
                                         {{.startSeconds = 5, .bytesUp = kOneSecondUp},
                                          {.startSeconds = 0, .bytesUp = kOneSecondUp}});  // any order
  EXPECT_EQ(e.promotions, 1);
  EXPECT_NEAR(e.tail, 3.964294 + kLteTail, 1e-9);
  EXPECT_NEAR(e.radio(), 23.50973707, 1e-9);
}

TEST(EnergyModel, TwoTransfersApartPayTwice) {
  // The first tail ends at 1.2601 + 11.576 = 12.8361 s; at 30 s the radio is
  // idle again: two promotions, two transfers, two whole tails.
  // 2 * 16.06545307 = 32.13090614 J.
  const EnergyBreakdown e = deviceEnergy(radioPowerModel("lte"), kLte,
                                         {{.startSeconds = 0, .bytesUp = kOneSecondUp},
                                          {.startSeconds = 30, .bytesUp = kOneSecondUp}});
  EXPECT_EQ(e.promotions, 2);
  EXPECT_NEAR(e.radio(), 32.13090614, 1e-9);
}

TEST(EnergyModel, ATransferJustAfterTheTailPaysANewPromotion) {
  // The tail ends at 12.8361 s. At 12.8 s the radio is still connected (one
  // promotion); at 12.9 s it went idle (two).
  const auto& lte = radioPowerModel("lte");
  const auto inside = deviceEnergy(lte, kLte, {{.startSeconds = 0, .bytesUp = kOneSecondUp},
                                               {.startSeconds = 12.8, .bytesUp = kOneSecondUp}});
  const auto after = deviceEnergy(lte, kLte, {{.startSeconds = 0, .bytesUp = kOneSecondUp},
                                              {.startSeconds = 12.9, .bytesUp = kOneSecondUp}});
  EXPECT_EQ(inside.promotions, 1);
  EXPECT_EQ(after.promotions, 2);
  // Inside: the tail ran 11.5399 s before the second transfer cut it.
  EXPECT_NEAR(inside.tail, 11.5399 * 1.060 + kLteTail, 1e-9);
  // After: two whole tails, not one whole and a cut one.
  EXPECT_NEAR(after.tail, 2 * kLteTail, 1e-9);
}

TEST(EnergyModel, ThreeGsTailHasTwoStages) {
  // 3g, 0.5 Mbit/s up: 62,500 bytes is one second. Transfer power
  // 0.86898 * 0.5 + 0.81788 = 1.25237 W. Promotion 0.5821 * 0.6594 =
  // 0.38383674 J. Whole tail: 8.0882 * 0.8039 + 0.8242 * 0.6013 =
  // 6.50210398 + 0.49559146 = 6.99769544 J.
  // Data moves [0.5821, 1.5821]; DCH until 9.6703, FACH until 10.4945.
  // A second transfer at 10 s is 0.3297 s into FACH: the tail so far is
  // 6.50210398 + 0.3297 * 0.6013 = 6.70035259 J, no promotion.
  const LinkRates threeG{.upMbit = 0.5, .downMbit = 2};
  const auto& radio = radioPowerModel("3g");
  const auto e = deviceEnergy(radio, threeG, {{.startSeconds = 0, .bytesUp = 62'500},
                                              {.startSeconds = 10, .bytesUp = 62'500}});
  EXPECT_EQ(e.promotions, 1);
  EXPECT_NEAR(e.promotion, 0.38383674, 1e-9);
  EXPECT_NEAR(e.transfer, 2 * 1.25237, 1e-9);
  EXPECT_NEAR(e.tail, 6.70035259 + 6.99769544, 1e-9);
  // At 10.6 s the FACH stage is over too: a new promotion.
  const auto later = deviceEnergy(radio, threeG, {{.startSeconds = 0, .bytesUp = 62'500},
                                                  {.startSeconds = 10.6, .bytesUp = 62'500}});
  EXPECT_EQ(later.promotions, 2);
}

TEST(EnergyModel, WifiCostsLittleAndForgetsQuickly) {
  // wifi, 15 Mbit/s up: 1,875,000 bytes is one second. Transfer:
  // 0.28317 * 15 + 0.13286 = 4.38041 W. Promotion 0.0791 * 0.1244 =
  // 0.00984004 J; tail 0.2381 * 0.1193 = 0.02840533 J. A second push 1 s
  // later finds the radio idle: the tail is a quarter of a second.
  const LinkRates wifi{.upMbit = 15, .downMbit = 30};
  const auto e = deviceEnergy(radioPowerModel("wifi"), wifi, {{.startSeconds = 0, .bytesUp = 1'875'000},
                                                              {.startSeconds = 2, .bytesUp = 1'875'000}});
  EXPECT_EQ(e.promotions, 2);
  EXPECT_NEAR(e.radio(), 2 * (0.00984004 + 4.38041 + 0.02840533), 1e-9);
}

TEST(EnergyModel, DownlinkBytesCountAtTheirOwnRateAndPower) {
  // 1.5 MB down at 12 Mbit/s is 1 s, with 62,500 bytes up (0.5 Mbit/s in
  // that second): P = 0.43839 * 0.5 + 0.05197 * 12 + 1.28804 = 0.219195 +
  // 0.62364 + 1.28804 = 2.130875 W.
  const auto e = deviceEnergy(radioPowerModel("lte"), kLte,
                              {{.startSeconds = 0, .bytesUp = 62'500, .bytesDown = 1'500'000}});
  EXPECT_NEAR(e.busySeconds, 1.0, 1e-12);
  EXPECT_NEAR(e.transfer, 2.130875, 1e-9);
}

TEST(EnergyModel, ATransferWaitsForTheOneBeforeIt) {
  // Two 1 s transfers asked for at 0 and 0.5 s: the second moves from
  // 1.2601 s, right after the first, so no tail passes between them.
  const auto e = deviceEnergy(radioPowerModel("lte"), kLte, {{.startSeconds = 0, .bytesUp = kOneSecondUp},
                                                             {.startSeconds = 0.5, .bytesUp = kOneSecondUp}});
  EXPECT_EQ(e.promotions, 1);
  EXPECT_NEAR(e.tail, kLteTail, 1e-9);
  EXPECT_NEAR(e.transfer, 2 * kLteTransfer, 1e-9);
}

TEST(EnergyModel, AnAccountThatEndsCutsTheLastTail) {
  // Ended at 5 s: the tail from 1.2601 s ran 3.7399 s, 3.964294 J.
  const auto& lte = radioPowerModel("lte");
  const auto e = deviceEnergy(lte, kLte, {{.startSeconds = 0, .bytesUp = kOneSecondUp}}, 0, kPhoneCoreWatts, 5);
  EXPECT_NEAR(e.tail, 3.964294, 1e-9);
  EXPECT_NEAR(e.radio(), kLtePromotion + kLteTransfer + 3.964294, 1e-9);
  // An end after the tail changes nothing; a transfer after the end is refused.
  EXPECT_NEAR(deviceEnergy(lte, kLte, {{.startSeconds = 0, .bytesUp = kOneSecondUp}}, 0, kPhoneCoreWatts, 60).tail,
              kLteTail, 1e-9);
  EXPECT_THROW(deviceEnergy(lte, kLte, {{.startSeconds = 6}}, 0, kPhoneCoreWatts, 5), Error);
}

TEST(EnergyModel, CpuSecondsCostTheCoresPower) {
  const auto e = deviceEnergy(radioPowerModel("lte"), kLte, {}, 2.5);
  EXPECT_NEAR(e.cpu, 2.5 * kPhoneCoreWatts, 1e-12);
  EXPECT_EQ(e.radio(), 0.0);
}

TEST(EnergyModel, RefusesWhatItCannotPrice) {
  EXPECT_THROW(radioPowerModel("5g"), Error);
  EXPECT_THROW(deviceEnergy(radioPowerModel("lte"), {.upMbit = 0, .downMbit = 1}, {}), Error);
  EXPECT_THROW(energyPerMinute(radioPowerModel("lte"), kLte, {.cycleSeconds = 0}), Error);
}

TEST(EnergyModel, PushesInsideTheTailKeepTheRadioOnAllMinute) {
  // A push of 1 s every 2 s on lte: the radio never reaches idle. Per
  // minute: 30 transfers (30 * 3.47999 = 104.3997 J) and 30 s of tail
  // (31.8 J), no promotion.
  const auto rate = energyPerMinute(radioPowerModel("lte"), kLte, {.cycleSeconds = 2, .bytesPerPush = kOneSecondUp});
  EXPECT_EQ(rate.promotions, 0);
  EXPECT_NEAR(rate.transfer, 104.3997, 1e-6);
  EXPECT_NEAR(rate.tail, 31.8, 1e-6);
  EXPECT_NEAR(rate.busySeconds, 30, 1e-9);
}

TEST(EnergyModel, PushesApartPayAPromotionAndATailEach) {
  // A push of 1 s every 20 s: three per minute, each 16.06545307 J
  // (48.19635921 J), plus 0.5 CPU-second each (3 * 0.5 * 1.2 = 1.8 J).
  const auto rate = energyPerMinute(radioPowerModel("lte"), kLte,
                                    {.cycleSeconds = 20, .bytesPerPush = kOneSecondUp, .cpuSecondsPerPush = 0.5});
  EXPECT_EQ(rate.promotions, 3);
  EXPECT_NEAR(rate.radio(), 48.19635921, 1e-6);
  EXPECT_NEAR(rate.cpu, 1.8, 1e-9);
}

}  // namespace
}  // namespace vmsync
