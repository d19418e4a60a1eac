// The chaos harness's schedule: what happens at each step, drawn from a seed
// before the run starts, so that a seed replays the same steps.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace vmsync::testing {

/// The cluster's devices, as the schedule names them.
inline const std::vector<std::string> kDevices{"A", "B", "C"};
/// What a "link profile" step draws from the schedule's own stream; the
/// second stream (see schedule()) makes half of its lte flaky.
inline const std::vector<std::string> kProfiles{"wifi", "lte", "3g"};

enum class Kind { Switch, SwitchCut, SwitchKill, Flap, ServerKill, StandbyKill, ActiveKill, Profile, Renumber };
const char* kindName(Kind k);

/// Where in a switch a link is cut: as the command starts (catch-up,
/// handOff), when the server pauses the source (final push), a moment after
/// that (forward to the target, activate and its reply), or as it returns.
enum class Phase { AtStart, AtPause, AfterPause, AtEnd };
const char* phaseName(Phase p);

/// One step of the schedule, all drawn from the seed before the run starts.
/// Devices are named by draw ("the k-th device other than the active one"),
/// resolved against the cluster as it is when the step comes.
struct Step {
  Kind kind = Kind::Switch;
  int pick = 0;        // which device (an index, modulo what there is to pick from)
  bool cutSource = false;
  Phase phase = Phase::AtStart;
  int delayMs = 0;     // after the trigger, before the fault
  int durationMs = 0;  // of the fault
  std::string profile;
};

/// The first `steps` steps of `seed`'s schedule, for a cluster whose
/// connections are given up after `deadLinkSeconds` of silence (the longest
/// outages outlast it by 1 to 4 s).
std::vector<Step> schedule(std::uint64_t seed, int steps, int deadLinkSeconds);
/// Whom a kill during a switch takes: the server, the source or the target.
const char* victimName(const Step& s);
/// One line for the events log.
std::string describe(const Step& s);

}  // namespace vmsync::testing
