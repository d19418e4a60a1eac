// Plots of the lab's commands (study, bench switch, bench server): each
// draws its PNGs from a gnuplot script kept beside them, so that a figure can
// be redrawn or restyled later, also where gnuplot was missing.
#pragma once

#include <string>
#include <vector>

namespace vmsync {

/// The lines a plot script opens with: PNGs of `width` x `height` pixels,
/// labels drawn as written (no enhanced-text markup: "device_state" keeps its
/// underscore), a grid.
std::string gnuplotPreamble(int width, int height);

/// `text` as a gnuplot string literal: in double quotes, with `"`, `\` and
/// line breaks escaped (a title may have two lines).
std::string gnuplotQuote(const std::string& text);

/// Writes `script` to `scriptPath` and runs gnuplot on it (no shell), its
/// messages going to `scriptPath` with the extension ".gnuplot.log". Returns
/// "" once gnuplot drew the plots, else why it did not, in words a user can
/// act on: gnuplot is not installed, or it failed and its log says why.
std::string runGnuplot(const std::string& scriptPath, const std::string& script);

/// Runs `script` as runGnuplot does and says what came of it: the path of
/// each of the `pngs` it draws on stdout ("plot: PATH"), or a warning from
/// `command` that names the reason and the script, the rest of the command's
/// output being complete without the plots.
void drawPlots(const std::string& command, const std::string& scriptPath, const std::string& script,
               const std::vector<std::string>& pngs);

}  // namespace vmsync
