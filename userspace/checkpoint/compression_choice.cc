#include "checkpoint/compression_choice.h"

#include <fmt/format.h>

#include <charconv>
#include <cmath>

#include "base/error.h"
#include "checkpoint/blob_frames.h"

namespace vmsync {

std::string PayloadCompression::name() const {
  switch (kind) {
    case wire::Compression::NONE: return "none";
    case wire::Compression::LZ4: return "lz4";
    case wire::Compression::ZSTD: return fmt::format("zstd:{}", level);
  }
  return "unknown";
}

std::string CompressionSetting::name() const { return automatic ? "auto" : fixed.name(); }

CompressionSetting parseCompressionSetting(std::string_view text) {
  CompressionSetting setting;
  if (text == "auto") return setting;
  setting.automatic = false;
  if (text == "none") {
    setting.fixed = {wire::Compression::NONE, 0};
  } else if (text == "lz4") {
    setting.fixed = {wire::Compression::LZ4, 0};
  } else if (text == "zstd") {
    setting.fixed = {wire::Compression::ZSTD, kDefaultZstdLevel};
  } else if (text.starts_with("zstd:")) {
    const std::string_view digits = text.substr(5);
    int level = 0;
    auto [end, error] = std::from_chars(digits.data(), digits.data() + digits.size(), level);
    if (error != std::errc{} || end != digits.data() + digits.size() || level < 1 || level > maxZstdLevel())
      fail("compression '{}': the zstd level must be a number from 1 to {}", text, maxZstdLevel());
    setting.fixed = {wire::Compression::ZSTD, level};
  } else {
    fail("unknown compression '{}': use auto, none, lz4, zstd or zstd:LEVEL", text);
  }
  return setting;
}

namespace {

/// Rough figures for guest pages on one core of a current x86 CPU (raw bytes
/// per CPU second, wire bytes per raw byte), only a starting point: the
/// selector follows what checkpoints really cost.
struct Prior {
  PayloadCompression compression;
  double speed;
  double ratio;
};
const Prior kPriors[] = {
    {{wire::Compression::LZ4, 0}, 500e6, 0.45},  {{wire::Compression::ZSTD, 1}, 300e6, 0.34},
    {{wire::Compression::ZSTD, 3}, 150e6, 0.31}, {{wire::Compression::ZSTD, 9}, 40e6, 0.28},
    {{wire::Compression::ZSTD, 19}, 3e6, 0.25},
};
/// For a level without a prior: between its neighbours' (zstd speed falls
/// about geometrically with the level).
Prior priorFor(const PayloadCompression& c) {
  for (const Prior& p : kPriors)
    if (p.compression == c) return p;
  if (c.kind == wire::Compression::NONE) return {c, 10e9, 1.0};
  if (c.kind == wire::Compression::LZ4) return kPriors[0];
  const double level = c.level;
  return {c, 300e6 * std::pow(0.75, level - 1), std::max(0.24, 0.34 - 0.005 * (level - 1))};
}

/// Weight of the newest measurement in the running estimates.
constexpr double kNewest = 0.3;
double blend(double estimate, double sample) { return estimate == 0 ? sample : (1 - kNewest) * estimate + kNewest * sample; }

}  // namespace

CompressionSelector::CompressionSelector(std::vector<PayloadCompression> candidates, double cpuShare)
    : cpuShare_(cpuShare) {
  if (candidates.empty())
    for (const Prior& p : kPriors) candidates.push_back(p.compression);
  for (const auto& c : candidates) {
    const Prior p = priorFor(c);
    candidates_.push_back({c, p.speed, p.ratio});
  }
  if (find({wire::Compression::LZ4, 0}) == nullptr) {
    const Prior p = kPriors[0];
    candidates_.insert(candidates_.begin(), {p.compression, p.speed, p.ratio});
  }
}

const CompressionSelector::Candidate* CompressionSelector::find(const PayloadCompression& c) const {
  for (const auto& candidate : candidates_)
    if (candidate.compression == c) return &candidate;
  return nullptr;
}

void CompressionSelector::onEncoded(const PayloadCompression& used, std::uint64_t rawBytes, std::uint64_t wireBytes,
                                    double cpuSeconds) {
  // A few pages tell little of speed (timer resolution, cache misses).
  if (rawBytes < (64u << 10) || cpuSeconds <= 0) return;
  for (auto& candidate : candidates_) {
    if (!(candidate.compression == used)) continue;
    candidate.speed = blend(candidate.speed, static_cast<double>(rawBytes) / cpuSeconds);
    candidate.ratio = blend(candidate.ratio, static_cast<double>(wireBytes) / static_cast<double>(rawBytes));
  }
}

void CompressionSelector::onPush(std::uint64_t wireBytes, double seconds) {
  if (seconds <= 0 || wireBytes == 0) return;
  linkRate_ = blend(linkRate_, static_cast<double>(wireBytes) / seconds);
}

double CompressionSelector::scaledPrior(const PayloadCompression& c, double Candidate::*measured,
                                        double Candidate::*prior, double priorIfNotCandidate) const {
  // How this machine and data compare with the priors, from the choices measured so far.
  double logFactor = 0;
  int count = 0;
  for (const auto& candidate : candidates_)
    if (candidate.*measured > 0) {
      logFactor += std::log(candidate.*measured / candidate.*prior);
      ++count;
    }
  const Candidate* own = find(c);
  const double base = own != nullptr ? own->*prior : priorIfNotCandidate;
  return base * (count ? std::exp(logFactor / count) : 1.0);
}

double CompressionSelector::speed(const PayloadCompression& c) const {
  const Candidate* own = find(c);
  if (own != nullptr && own->speed > 0) return own->speed;
  return scaledPrior(c, &Candidate::speed, &Candidate::priorSpeed, priorFor(c).speed);
}

double CompressionSelector::ratio(const PayloadCompression& c) const {
  const Candidate* own = find(c);
  if (own != nullptr && own->ratio > 0) return own->ratio;
  return std::min(1.0, scaledPrior(c, &Candidate::ratio, &Candidate::priorRatio, priorFor(c).ratio));
}

PayloadCompression CompressionSelector::choice() const {
  const PayloadCompression lz4{wire::Compression::LZ4, 0};
  if (linkRate_ <= 0) return lz4;
  PayloadCompression best = lz4;
  double bestRatio = ratio(lz4);
  for (const auto& candidate : candidates_) {
    const PayloadCompression& c = candidate.compression;
    // CPU per raw byte <= cpuShare x link time per raw byte.
    const bool affordable = 1.0 / speed(c) <= cpuShare_ * ratio(c) / linkRate_;
    if (affordable && ratio(c) < bestRatio) {
      best = c;
      bestRatio = ratio(c);
    }
  }
  return best;
}

std::string CompressionSelector::explain() const {
  // Before the first push there is no link rate: say so, not "0.00 Mbit/s".
  std::string out = linkRate_ > 0 ? fmt::format("link {:.2f} Mbit/s; CPU may take {:.0f}% of the link time;",
                                                linkRate_ * 8 / 1e6, cpuShare_ * 100)
                                  : std::string("link not measured yet (lz4 until the first push is timed);");
  for (const auto& candidate : candidates_) {
    const PayloadCompression& c = candidate.compression;
    const double share = linkRate_ > 0 ? (1.0 / speed(c)) / (ratio(c) / linkRate_) : 0;
    out += fmt::format(" {} {:.0f} MB/s ratio {:.2f}{} CPU {:.0f}%;", c.name(), speed(c) / 1e6, ratio(c),
                       candidate.speed > 0 ? " (measured)" : "", share * 100);
  }
  out.pop_back();
  return out;
}

}  // namespace vmsync
