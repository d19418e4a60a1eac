#!/bin/sh
# video+music: the paper's combined workload, both decoded in real time at once.
# needs: ffmpeg
# asset: video music
# memory-mb: 512
# disk-mb: 512
d=${VMSYNC_DURATION:-60}
ffmpeg -nostdin -hide_banner -loglevel error -re -stream_loop -1 -i /media/music.ogg -t "$d" -f s16le -y /dev/null &
ffmpeg -nostdin -hide_banner -loglevel error -re -stream_loop -1 -i /media/clip.mp4 -t "$d" \
  -f rawvideo -pix_fmt rgb24 -y /dev/null
wait
echo "vmsync-workload: done"
