// The device state in a final checkpoint: compressed when that pays, decoded
// back to the same bytes, and refused with a reason when it lies about itself.
#include <capnp/message.h>
#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "base/error.h"
#include "checkpoint/device_state_codec.h"

namespace vmsync {
namespace {

/// A state like QEMU's: sections of structure, long runs of zeros.
std::vector<std::byte> stateLike(std::size_t bytes, std::uint32_t seed) {
  std::vector<std::byte> state(bytes);
  std::mt19937 random(seed);
  for (std::size_t at = 0; at < bytes; at += 4096)
    for (std::size_t i = at; i < std::min(bytes, at + 64); ++i) state[i] = std::byte(random() & 0xff);
  return state;
}

std::string errorOf(wire::Checkpoint::Reader checkpoint) {
  try {
    deviceStateOf(checkpoint);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(DeviceStateCodec, ACompressibleStateTravelsAsLz4AndDecodesToTheSameBytes) {
  const auto state = stateLike(334140, 1);
  capnp::MallocMessageBuilder message;
  auto checkpoint = message.initRoot<wire::Checkpoint>();
  const std::uint64_t wire = setDeviceState(checkpoint, state);
  EXPECT_EQ(checkpoint.getDeviceStateEncoding(), wire::StateEncoding::LZ4);
  EXPECT_EQ(wire, checkpoint.getDeviceState().size());
  EXPECT_LT(wire, state.size() / 4);
  EXPECT_EQ(checkpoint.getDeviceStateRawSize(), state.size());
  EXPECT_EQ(deviceStateOf(checkpoint.asReader()), state);

  // Copied as it is encoded (a server's merge), it still decodes.
  capnp::MallocMessageBuilder other;
  auto copy = other.initRoot<wire::Checkpoint>();
  copyDeviceState(checkpoint.asReader(), copy);
  EXPECT_EQ(copy.getDeviceStateEncoding(), wire::StateEncoding::LZ4);
  EXPECT_EQ(deviceStateOf(copy.asReader()), state);
}

TEST(DeviceStateCodec, AStateThatDoesNotCompressTravelsRawAndAnOldRawStateStillReads) {
  std::vector<std::byte> noise(8192);
  std::mt19937 random(7);
  for (auto& b : noise) b = std::byte(random() & 0xff);
  capnp::MallocMessageBuilder message;
  auto checkpoint = message.initRoot<wire::Checkpoint>();
  EXPECT_EQ(setDeviceState(checkpoint, noise), noise.size());
  EXPECT_EQ(checkpoint.getDeviceStateEncoding(), wire::StateEncoding::RAW);
  EXPECT_EQ(deviceStateOf(checkpoint.asReader()), noise);

  // Written before the encoding existed: raw, with no size recorded.
  capnp::MallocMessageBuilder old;
  auto before = old.initRoot<wire::Checkpoint>();
  before.setDeviceState(kj::StringPtr("cpu and devices").asBytes());
  const auto read = deviceStateOf(before.asReader());
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(read.data()), read.size()), "cpu and devices");
}

TEST(DeviceStateCodec, AStateThatLiesAboutItselfIsRefusedWithTheReason) {
  const auto state = stateLike(65536, 2);
  capnp::MallocMessageBuilder message;
  auto checkpoint = message.initRoot<wire::Checkpoint>();
  checkpoint.setSequence(9);
  setDeviceState(checkpoint, state);
  ASSERT_EQ(checkpoint.getDeviceStateEncoding(), wire::StateEncoding::LZ4);

  checkpoint.setDeviceStateRawSize(state.size() + 1);  // claims a byte more than it decodes to
  EXPECT_NE(errorOf(checkpoint).find("checkpoint 9: its device state does not decode to the 65537 bytes it claims"),
            std::string::npos)
      << errorOf(checkpoint);
  checkpoint.setDeviceStateRawSize(kMaxDeviceStateBytes + 1);  // a bomb: refused before memory is taken
  EXPECT_NE(errorOf(checkpoint).find("at most"), std::string::npos) << errorOf(checkpoint);
  // A block cut short (a message built from a truncated state) does not decode.
  checkpoint.setDeviceStateRawSize(state.size());
  const auto whole = checkpoint.getDeviceState();
  const std::vector<kj::byte> cut(whole.begin(), whole.begin() + whole.size() / 2);
  checkpoint.setDeviceState(kj::arrayPtr(cut.data(), cut.size()));
  EXPECT_NE(errorOf(checkpoint).find("does not decode to the 65536 bytes"), std::string::npos) << errorOf(checkpoint);

  capnp::MallocMessageBuilder raw;
  auto lying = raw.initRoot<wire::Checkpoint>();
  lying.setSequence(4);
  lying.setDeviceState(kj::StringPtr("abc").asBytes());
  lying.setDeviceStateRawSize(5);
  EXPECT_NE(errorOf(lying).find("checkpoint 4: its device state is 3 bytes but says it is 5"), std::string::npos)
      << errorOf(lying);
}

}  // namespace
}  // namespace vmsync
