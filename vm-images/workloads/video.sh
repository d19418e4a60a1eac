#!/bin/sh
# video: an H.264 clip (made at build time) decoded in real time by ffmpeg,
# looped for the run's duration; the paper's YouTube stand-in.
# needs: ffmpeg
# asset: video
# memory-mb: 384
# disk-mb: 512
ffmpeg -nostdin -hide_banner -loglevel error -re -stream_loop -1 -i /media/clip.mp4 \
  -t "${VMSYNC_DURATION:-60}" -f rawvideo -pix_fmt rgb24 -y /dev/null
echo "vmsync-workload: done"
