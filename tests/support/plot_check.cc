#include "plot_check.h"

#include <gtest/gtest.h>

#include "test_env.h"

namespace vmsync::testing {

std::string missingForPlots() {
  std::string out;
  return run({"gnuplot", "--version"}, &out) == 0 ? "" : "gnuplot is not installed";
}

namespace {

std::uint32_t bigEndian32(const std::string& bytes, std::size_t at) {
  std::uint32_t value = 0;
  for (std::size_t i = 0; i < 4; ++i) value = value << 8 | static_cast<unsigned char>(bytes[at + i]);
  return value;
}

}  // namespace

std::string readPngSize(const std::string& path, PngSize& size) {
  const std::string bytes = readFile(path);
  const std::string signature("\x89PNG\r\n\x1a\n", 8);
  // The IEND chunk: length 0, its type, and the CRC of the type (no data).
  const std::string end("\0\0\0\0IEND\xae\x42\x60\x82", 12);
  constexpr std::size_t kIhdrChunk = 4 + 4 + 13 + 4;  // length, type, data, CRC
  if (bytes.empty()) return path + " is missing or empty";
  if (bytes.compare(0, signature.size(), signature) != 0) return path + " does not open with the PNG signature";
  if (bytes.size() < signature.size() + kIhdrChunk + end.size()) return path + " is too short for a PNG";
  if (bytes.compare(12, 4, "IHDR") != 0 || bigEndian32(bytes, 8) != 13)
    return path + " has no IHDR chunk of 13 bytes after its signature";
  if (bytes.compare(bytes.size() - end.size(), end.size(), end) != 0)
    return path + " does not end with an IEND chunk (cut short?)";
  size.width = bigEndian32(bytes, 16);
  size.height = bigEndian32(bytes, 20);
  return "";
}

void expectPlot(const std::string& output, const std::string& png) {
  EXPECT_NE(output.find("plot: " + png + "\n"), std::string::npos) << "no line names " << png << " in\n" << output;
  PngSize size;
  const std::string wrong = readPngSize(png, size);
  ASSERT_EQ(wrong, "");
  EXPECT_GE(size.width, 640u) << png;
  EXPECT_LE(size.width, 4000u) << png;
  EXPECT_GE(size.height, 400u) << png;
  EXPECT_LE(size.height, 4000u) << png;
}

}  // namespace vmsync::testing
