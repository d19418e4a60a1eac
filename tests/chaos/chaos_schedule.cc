#include "chaos_schedule.h"

#include <fmt/format.h>

#include <random>

namespace vmsync::testing {

const char* kindName(Kind k) {
  switch (k) {
    case Kind::Switch: return "switch";
    case Kind::SwitchCut: return "switch+cut";
    case Kind::SwitchKill: return "switch+kill -9";
    case Kind::Flap: return "link flap";
    case Kind::ServerKill: return "server kill -9";
    case Kind::StandbyKill: return "standby kill -9";
    case Kind::ActiveKill: return "active kill -9";
    case Kind::Profile: return "link profile";
    case Kind::Renumber: return "renumber";
  }
  return "?";
}

const char* phaseName(Phase p) {
  switch (p) {
    case Phase::AtStart: return "as it starts";
    case Phase::AtPause: return "at the pause";
    case Phase::AfterPause: return "after the pause";
    case Phase::AtEnd: return "as it ends";
  }
  return "?";
}

std::vector<Step> schedule(std::uint64_t seed, int steps, int deadLinkSeconds) {
  std::mt19937_64 random(seed);
  // Kinds added after the first schedules come from a stream of their own,
  // so that the first stream's draws, and with them every step that the new
  // kinds do not replace, stay what they were for a seed.
  std::mt19937_64 later(seed ^ 0x6c6f737379ull);
  auto laterUniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(later); };
  auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(random); };
  // Weights: switches most, then cuts during switches, flaps, and the kills.
  const std::vector<std::pair<Kind, int>> weights{{Kind::Switch, 26},     {Kind::SwitchCut, 20},
                                                  {Kind::SwitchKill, 12}, {Kind::Flap, 14},
                                                  {Kind::ServerKill, 8},  {Kind::StandbyKill, 7},
                                                  {Kind::ActiveKill, 6},  {Kind::Profile, 7}};
  int total = 0;
  for (const auto& [k, w] : weights) total += w;
  std::vector<Step> out;
  for (int i = 0; i < steps; ++i) {
    Step s;
    int draw = uniform(0, total - 1);
    for (const auto& [k, w] : weights) {
      if (draw < w) {
        s.kind = k;
        break;
      }
      draw -= w;
    }
    s.pick = uniform(0, 5);
    s.cutSource = uniform(0, 1) == 1;
    s.phase = static_cast<Phase>(uniform(0, 3));
    // A switch on these links takes about a second from the pause on: the
    // delays after it are short so that most cuts land inside it.
    s.delayMs = s.phase == Phase::AtPause ? uniform(0, 150) : s.phase == Phase::AfterPause ? uniform(0, 400)
                                                                                            : uniform(0, 1500);
    // Outages: sub-second, a few seconds (past the lease timeout), and past
    // the dead-link timeout.
    const int band = uniform(0, 99);
    s.durationMs = band < 50   ? uniform(150, 900)
                   : band < 85 ? uniform(1000, 8000)
                               : deadLinkSeconds * 1000 + uniform(1000, 4000);
    s.profile = kProfiles[uniform(0, static_cast<int>(kProfiles.size()) - 1)];
    if (s.kind == Kind::ServerKill || s.kind == Kind::StandbyKill || s.kind == Kind::SwitchKill)
      s.durationMs = uniform(0, 3000);
    // The second stream: a step in 16 renumbers a device instead, and half
    // of the changes to lte go to flaky (lte with outages) instead.
    // Both draws are made at every step, so that the stream stays aligned
    // with the steps.
    const bool renumber = laterUniform(0, 15) == 0;
    const bool flaky = laterUniform(0, 1) == 0;
    if (renumber) s.kind = Kind::Renumber;
    if (flaky && s.profile == "lte") s.profile = "flaky";
    out.push_back(s);
  }
  return out;
}

const char* victimName(const Step& s) {
  static const char* names[] = {"server", "source", "target"};
  return names[(s.pick / 2) % 3];
}

std::string describe(const Step& s) {
  switch (s.kind) {
    case Kind::Switch: return fmt::format("switch (pick {})", s.pick);
    case Kind::SwitchCut:
      return fmt::format("switch (pick {}), the {}'s link cut {} +{} ms for {} ms", s.pick,
                         s.cutSource ? "source" : "target", phaseName(s.phase), s.delayMs, s.durationMs);
    case Kind::SwitchKill:
      return fmt::format("switch (pick {}), kill -9 of the {} {} +{} ms", s.pick, victimName(s), phaseName(s.phase),
                         s.delayMs);
    case Kind::Flap: return fmt::format("link of device pick {} down for {} ms", s.pick, s.durationMs);
    case Kind::ServerKill: return fmt::format("server kill -9 and power cut, restarted after {} ms", s.durationMs);
    case Kind::StandbyKill: return fmt::format("standby pick {} kill -9, restarted after {} ms", s.pick, s.durationMs);
    case Kind::ActiveKill: return fmt::format("active kill -9 (daemon and QEMU), forced switch to pick {}", s.pick);
    case Kind::Profile: return fmt::format("link of device pick {} becomes {}", s.pick, s.profile);
    case Kind::Renumber: return fmt::format("device pick {} gets a new address on its link", s.pick);
  }
  return "?";
}

}  // namespace vmsync::testing
