#include "checkpoint/blob_frames.h"

#include <zstd.h>

#include <memory>

#include "base/error.h"

namespace vmsync {

namespace {

struct CompressContextFree {
  void operator()(ZSTD_CCtx* context) const { ZSTD_freeCCtx(context); }
};
struct DecompressContextFree {
  void operator()(ZSTD_DCtx* context) const { ZSTD_freeDCtx(context); }
};

/// A context per thread: making one costs more than compressing a few units.
ZSTD_CCtx* compressContext() {
  thread_local std::unique_ptr<ZSTD_CCtx, CompressContextFree> context(ZSTD_createCCtx());
  if (!context) fail("cannot allocate a zstd compression context");
  return context.get();
}

ZSTD_DCtx* decompressContext() {
  thread_local std::unique_ptr<ZSTD_DCtx, DecompressContextFree> context(ZSTD_createDCtx());
  if (!context) fail("cannot allocate a zstd decompression context");
  return context.get();
}

}  // namespace

int maxZstdLevel() { return ZSTD_maxCLevel(); }

std::size_t zstdFrameBound(std::size_t rawBytes) { return ZSTD_compressBound(rawBytes); }

std::size_t compressZstdFrame(std::span<const std::byte> raw, int level, std::span<std::byte> out) {
  if (raw.empty()) return 0;
  if (out.size() < zstdFrameBound(raw.size()))
    fail("zstd output room of {} bytes is below the bound {} for {} bytes", out.size(),
         zstdFrameBound(raw.size()), raw.size());
  ZSTD_CCtx* context = compressContext();
  ZSTD_CCtx_reset(context, ZSTD_reset_session_and_parameters);
  ZSTD_CCtx_setParameter(context, ZSTD_c_compressionLevel, level);
  // The header says how many bytes the frame holds: a receiver checks that
  // against the message before it allocates anything.
  ZSTD_CCtx_setParameter(context, ZSTD_c_contentSizeFlag, 1);
  // No checksum: a stored checkpoint's record has its own (xxh3), and the
  // link is TLS.
  ZSTD_CCtx_setParameter(context, ZSTD_c_checksumFlag, 0);
  const std::size_t n = ZSTD_compress2(context, out.data(), out.size(), raw.data(), raw.size());
  if (ZSTD_isError(n)) fail("zstd level {} could not compress {} bytes: {}", level, raw.size(), ZSTD_getErrorName(n));
  return n < raw.size() ? n : 0;
}

void decompressZstdFrame(std::span<const std::byte> frame, std::span<std::byte> out, std::string_view what) {
  const unsigned long long content = ZSTD_getFrameContentSize(frame.data(), frame.size());
  if (content == ZSTD_CONTENTSIZE_ERROR) fail("{}: not a zstd frame", what);
  if (content == ZSTD_CONTENTSIZE_UNKNOWN) fail("{}: the zstd frame does not say how many bytes it holds", what);
  if (content != out.size())
    fail("{}: the zstd frame says it holds {} bytes, the checkpoint says {}", what, content, out.size());
  const std::size_t frameBytes = ZSTD_findFrameCompressedSize(frame.data(), frame.size());
  if (ZSTD_isError(frameBytes)) fail("{}: the zstd frame is truncated or corrupt ({})", what, ZSTD_getErrorName(frameBytes));
  if (frameBytes != frame.size())
    fail("{}: {} bytes follow the zstd frame of {} bytes", what, frame.size() - frameBytes, frameBytes);
  // Into a buffer of the size the message declared (checked against its
  // chunks by the caller): zstd stops with an error rather than write past it.
  const std::size_t n = ZSTD_decompressDCtx(decompressContext(), out.data(), out.size(), frame.data(), frame.size());
  if (ZSTD_isError(n)) fail("{}: zstd data is corrupt ({})", what, ZSTD_getErrorName(n));
  if (n != out.size()) fail("{}: the zstd frame held {} bytes, not the {} it said", what, n, out.size());
}

}  // namespace vmsync
