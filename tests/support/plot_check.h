// What a test can check of the plots a command draws (study, bench switch,
// bench server) without decoding them: that gnuplot is there to draw them,
// and that a file is a whole PNG of a figure's size.
#pragma once

#include <cstdint>
#include <string>

namespace vmsync::testing {

/// Why the commands cannot draw plots here ("gnuplot is not installed"), or
/// empty when they can.
std::string missingForPlots();

/// The size a PNG gives in its header.
struct PngSize {
  std::uint32_t width = 0;
  std::uint32_t height = 0;
};

/// Reads `path` as a PNG: the 8-byte signature, an IHDR chunk first (the
/// size, filled in `size`) and an IEND chunk last, as a whole file has.
/// Returns "" when it is one, else what is wrong with it.
std::string readPngSize(const std::string& path, PngSize& size);

/// Expects a plot the command drew: its `output` names `png` ("plot: PATH"),
/// and the file is a PNG (readPngSize) between 640 x 400 and 4000 x 4000
/// pixels.
void expectPlot(const std::string& output, const std::string& png);

}  // namespace vmsync::testing
