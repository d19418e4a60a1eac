#include "lab/study_energy.h"

#include <fmt/format.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "base/error.h"
#include "lab/gnuplot.h"
#include "lab/network_lab.h"

namespace vmsync {

namespace fs = std::filesystem;

namespace {

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
}

/// Field by field, the median over runs of the rows at the same place.
std::vector<StudyEnergyRow> medianRows(const std::vector<std::vector<StudyEnergyRow>>& runs) {
  std::vector<StudyEnergyRow> rows = runs.front();
  for (std::size_t i = 0; i < rows.size(); ++i) {
    auto across = [&](auto get) {
      std::vector<double> v;
      for (const auto& run : runs) v.push_back(get(run.at(i)));
      return median(v);
    };
    auto& row = rows[i];
    row.bytesPerMinute = across([](const StudyEnergyRow& r) { return r.bytesPerMinute; });
    row.cpuSecondsPerMinute = across([](const StudyEnergyRow& r) { return r.cpuSecondsPerMinute; });
    row.linkBusy = across([](const StudyEnergyRow& r) { return r.linkBusy; });
    row.joulesPerMinute.promotion = across([](const StudyEnergyRow& r) { return r.joulesPerMinute.promotion; });
    row.joulesPerMinute.transfer = across([](const StudyEnergyRow& r) { return r.joulesPerMinute.transfer; });
    row.joulesPerMinute.tail = across([](const StudyEnergyRow& r) { return r.joulesPerMinute.tail; });
    row.joulesPerMinute.cpu = across([](const StudyEnergyRow& r) { return r.joulesPerMinute.cpu; });
    row.joulesPerMinute.busySeconds = across([](const StudyEnergyRow& r) { return r.joulesPerMinute.busySeconds; });
    row.joulesPerMinute.promotions = static_cast<int>(
        across([](const StudyEnergyRow& r) { return static_cast<double>(r.joulesPerMinute.promotions); }));
  }
  return rows;
}

const StudyEnergyRow* find(const std::vector<StudyEnergyRow>& rows, const std::string& policy,
                           std::uint32_t interval, const std::string& link) {
  for (const auto& row : rows)
    if (row.policy == policy && row.intervalSeconds == interval && row.link == link) return &row;
  return nullptr;
}

std::string mibPerMinute(double bytes) { return fmt::format("{:.2f}", bytes / (1 << 20)); }

void drawEnergyPlots(const fs::path& out, const std::string& workload, const std::vector<std::string>& policies) {
  std::string policyList;
  for (const auto& p : policies) policyList += (policyList.empty() ? "" : " ") + p;
  const std::string csv = gnuplotQuote((out / "energy.csv").string());
  std::ostringstream gp;
  gp << gnuplotPreamble(1000, 900) << "set datafile separator ','\nset logscale x\nset key top right\n";
  std::vector<std::string> pngs;
  for (const auto& link : studyEnergyLinks()) {
    const std::string png = (out / fmt::format("energy_{}.png", link)).string();
    pngs.push_back(png);
    // Rows are grouped by link, then policy, so each policy's points are
    // one run of lines in the file and its line is not broken.
    const std::string select = fmt::format("(strcol(3) eq '{}' && strcol(1) eq p ? $2 : 1/0)", link);
    gp << "set output " << gnuplotQuote(png) << "\n"
       << "set multiplot layout 2,1 title "
       << gnuplotQuote(fmt::format("Workload {} on {}: cost per minute against the checkpoint interval (median of "
                                   "runs)",
                                   workload, link))
       << "\n"
       << "set xlabel 'checkpoint interval (s)'\nset ylabel 'MiB per minute (lz4)'\n"
       << "plot for [p in '" << policyList << "'] " << csv << " using " << select
       << ":($4/1048576.0) with linespoints title p\n"
       << "set ylabel 'joules per minute (radio + CPU)'\n"
       << "plot for [p in '" << policyList << "'] " << csv << " using " << select
       << ":11 with linespoints title p\n"
       << "unset multiplot\n";
  }
  drawPlots("study", (out / "energy_plots.gp").string(), gp.str(), pngs);
}

}  // namespace

const std::vector<std::string>& studyEnergyLinks() {
  static const std::vector<std::string> links{"wifi", "lte", "3g"};
  return links;
}

std::vector<StudyEnergyRow> studyEnergy(const StudyPushes& pushes, double measuredSeconds) {
  if (!(measuredSeconds > 0)) fail("the study's measured time must be positive ({} s)", measuredSeconds);
  const double minutes = measuredSeconds / 60;
  std::vector<StudyEnergyRow> rows;
  for (const auto& link : studyEnergyLinks()) {
    const LinkProfile& profile = linkProfile(link);
    const RadioPowerModel& radio = radioPowerModel(link);
    const LinkRates rates{.upMbit = profile.upMbit, .downMbit = profile.downMbit};
    for (const auto& [policy, byInterval] : pushes) {
      for (const auto& [interval, list] : byInterval) {
        std::vector<RadioTransfer> transfers;
        double bytes = 0, cpu = 0;
        for (const auto& push : list) {
          transfers.push_back({.startSeconds = push.timeSeconds, .bytesUp = push.bytes});
          bytes += static_cast<double>(push.bytes);
          cpu += push.cpuSeconds;
        }
        // The tail after the last push is counted until the next push would
        // have come, as in a longer run: a short run would otherwise charge
        // a whole tail to few minutes.
        const EnergyBreakdown energy =
            deviceEnergy(radio, rates, std::move(transfers), cpu, kPhoneCoreWatts, measuredSeconds + interval);
        StudyEnergyRow row{.policy = policy, .intervalSeconds = interval, .link = link};
        row.bytesPerMinute = bytes / minutes;
        row.cpuSecondsPerMinute = cpu / minutes;
        row.linkBusy = energy.busySeconds / measuredSeconds;
        row.joulesPerMinute = energy;
        row.joulesPerMinute.promotion /= minutes;
        row.joulesPerMinute.transfer /= minutes;
        row.joulesPerMinute.tail /= minutes;
        row.joulesPerMinute.cpu /= minutes;
        row.joulesPerMinute.busySeconds /= minutes;
        row.joulesPerMinute.promotions = static_cast<int>(energy.promotions / minutes + 0.5);
        rows.push_back(std::move(row));
      }
    }
  }
  return rows;
}

std::string writeStudyEnergy(const std::string& outDir, const std::string& workload,
                             const std::vector<std::vector<StudyEnergyRow>>& runs) {
  if (runs.empty()) fail("no study run to account for");
  const fs::path out(outDir);
  const std::vector<StudyEnergyRow> rows = medianRows(runs);
  std::vector<std::string> policies;
  std::vector<std::uint32_t> intervals;
  for (const auto& row : rows) {
    if (std::find(policies.begin(), policies.end(), row.policy) == policies.end()) policies.push_back(row.policy);
    if (std::find(intervals.begin(), intervals.end(), row.intervalSeconds) == intervals.end())
      intervals.push_back(row.intervalSeconds);
  }
  std::sort(intervals.begin(), intervals.end());

  std::ofstream csv(out / "energy.csv");
  csv << "policy,interval_s,link,bytes_per_min,cpu_s_per_min,promotion_j_per_min,transfer_j_per_min,"
         "tail_j_per_min,cpu_j_per_min,radio_j_per_min,total_j_per_min,link_busy,promotions_per_min\n";
  for (const auto& row : rows) {
    const auto& e = row.joulesPerMinute;
    csv << row.policy << ',' << row.intervalSeconds << ',' << row.link << ','
        << fmt::format("{:.0f},{:.4f},{:.3f},{:.3f},{:.3f},{:.3f},{:.3f},{:.3f},{:.4f},{}", row.bytesPerMinute,
                       row.cpuSecondsPerMinute, e.promotion, e.transfer, e.tail, e.cpu, e.radio(), e.total(),
                       row.linkBusy, e.promotions)
        << '\n';
  }
  csv.close();
  if (!csv) fail("cannot write {}", (out / "energy.csv").string());

  std::ostringstream md;
  md << "\n## Energy per minute on each link\n\n"
     << "Each checkpoint of a policy at an interval is pushed at its time in the run, as its lz4 bytes (what the "
     << "daemon ships by default), up the link profile's uplink (wifi 15, lte 5, 3g 0.5 Mbit/s; one link: a push "
     << "waits for the one before it). The radio's power model (Huang et al., MobiSys 2012: promotion, transfer, "
     << "tail) prices the timeline; the CPU to harvest and encode each checkpoint is priced at one phone core, "
     << fmt::format("{:.1f} W", kPhoneCoreWatts) << " (this machine's CPU seconds, not a phone's). Per minute of "
     << "the measured run (the tail after the last push counts until the next push would have come); every "
     << "cell comes from the same run, so the guest made the same progress for each. "
     << "Median over runs; `energy.csv` has every part, `energy_<link>.png` the curves. See docs/benchmarks.md "
     << "(Energy) for the model and its sources.\n\n"
     << "| policy | interval (s) | MiB/min | CPU s/min |";
  for (const auto& link : studyEnergyLinks()) md << ' ' << link << " J/min |";
  md << "\n|---|---|---|---|";
  for (std::size_t i = 0; i < studyEnergyLinks().size(); ++i) md << "---|";
  md << '\n';
  for (const auto& policy : policies) {
    for (auto interval : intervals) {
      const StudyEnergyRow* first = find(rows, policy, interval, studyEnergyLinks().front());
      if (!first) continue;
      md << "| " << policy << " | " << interval << " | " << mibPerMinute(first->bytesPerMinute) << " | "
         << fmt::format("{:.2f}", first->cpuSecondsPerMinute) << " |";
      for (const auto& link : studyEnergyLinks())
        md << ' ' << fmt::format("{:.1f}", find(rows, policy, interval, link)->joulesPerMinute.total()) << " |";
      md << '\n';
    }
  }
  // The radio against the shortest interval: where pushes stay inside the
  // tail the radio never sleeps; past it, it does.
  const std::uint32_t shortest = intervals.front();
  for (const auto& link : studyEnergyLinks()) {
    const RadioPowerModel& radio = radioPowerModel(link);
    md << "\n### " << link << ": the radio, per minute\n\n"
       << fmt::format("Tail {:.2f} s. Radio energy against checkpoints every {} s of the same policy.\n\n",
                      radio.tailSeconds(), shortest)
       << "| policy | interval (s) | promotions/min | promotion J | transfer J | tail J | CPU J | link busy | radio "
          "against "
       << shortest << " s |\n|---|---|---|---|---|---|---|---|---|\n";
    for (const auto& policy : policies) {
      const StudyEnergyRow* base = find(rows, policy, shortest, link);
      for (auto interval : intervals) {
        const StudyEnergyRow* row = find(rows, policy, interval, link);
        if (!row || !base) continue;
        const auto& e = row->joulesPerMinute;
        const double base_radio = base->joulesPerMinute.radio();
        md << "| " << policy << " | " << interval << " | " << e.promotions << " | "
           << fmt::format("{:.1f} | {:.1f} | {:.1f} | {:.1f} | {:.0f} % | ", e.promotion, e.transfer, e.tail, e.cpu,
                          row->linkBusy * 100)
           << (base_radio > 0 ? fmt::format("{:+.0f} %", (e.radio() / base_radio - 1) * 100) : std::string("-"))
           << " |\n";
      }
    }
  }
  drawEnergyPlots(out, workload, policies);
  return md.str();
}

}  // namespace vmsync
