#!/bin/sh
# music: a Vorbis file (made at build time) decoded in real time, looped.
# needs: ffmpeg
# asset: music
# memory-mb: 384
# disk-mb: 512
ffmpeg -nostdin -hide_banner -loglevel error -re -stream_loop -1 -i /media/music.ogg \
  -t "${VMSYNC_DURATION:-60}" -f s16le -y /dev/null
echo "vmsync-workload: done"
