#!/usr/bin/env bash
# Stage an image-folder dataset (ImageNet: train/<class>/*.JPEG, val/<class>/*.JPEG) from shared
# storage onto this node's local disk, so DataLoader workers decode from local NVMe instead of every
# worker of every trial reading 1.28M small files over EFS.
#
#   scripts/stage_data.sh SRC DEST [--mount-nvme]
#
# SRC   a directory on shared storage holding the extracted tree (train/, val/) and, optionally,
#       train.tar and val.tar of the same trees (tar -C SRC -cf SRC/train.tar train): one sequential
#       read per split, several times faster than copying the files one by one over NFS.
# DEST  where the copy goes (the same path on every node, e.g. /data/imagenet, so --data is one path).
# --mount-nvme  first format and mount the instance's unused NVMe instance-store disk (g5: 250 GB
#       and up) at /mnt/nvme and put DEST there (its contents are lost when the instance stops).
#
# Idempotent: a finished copy leaves DEST/.staged and is not redone. Needs sudo only for --mount-nvme
# and for creating DEST's parent outside the user's reach.
set -euo pipefail

usage() { echo "usage: $0 SRC DEST [--mount-nvme]" >&2; exit 2; }
[ $# -ge 2 ] || usage
SRC=$1 DEST=$2 MOUNT=${3:-}
[ -z "$MOUNT" ] || [ "$MOUNT" = --mount-nvme ] || usage
[ -d "$SRC/train" ] && [ -d "$SRC/val" ] || { echo "$0: $SRC must hold train/ and val/" >&2; exit 2; }
if [ -f "$DEST/.staged" ]; then echo "$DEST already staged"; exit 0; fi

if [ "$MOUNT" = --mount-nvme ]; then
  # AWS names instance-store disks "Amazon EC2 NVMe Instance Storage"; take the first unmounted one.
  disk=$(lsblk -dnpo NAME,MODEL | awk '/Instance Storage/ {print $1; exit}')
  if [ -n "$disk" ] && ! mountpoint -q /mnt/nvme; then
    sudo mkfs.ext4 -q -F "$disk" && sudo mkdir -p /mnt/nvme && sudo mount "$disk" /mnt/nvme
    sudo chmod 1777 /mnt/nvme
  fi
  if mountpoint -q /mnt/nvme; then
    mkdir -p "/mnt/nvme/$(basename "$DEST")"
    sudo mkdir -p "$(dirname "$DEST")"
    [ -e "$DEST" ] || sudo ln -s "/mnt/nvme/$(basename "$DEST")" "$DEST"
  else
    echo "$0: no NVMe instance store on this node: staging onto the root disk" >&2
  fi
fi

mkdir -p "$DEST" 2>/dev/null || { sudo mkdir -p "$DEST" && sudo chown "$(id -u):$(id -g)" "$DEST"; }
start=$(date +%s)
for split in train val; do
  if [ -f "$SRC/$split.tar" ]; then
    tar -C "$DEST" -xf "$SRC/$split.tar"
  else  # one tar stream per class directory, 16 at a time: NFS latency hides behind parallel reads
    mkdir -p "$DEST/$split"
    (cd "$SRC/$split" && find . -mindepth 1 -maxdepth 1 -type d -print0 |
      xargs -0 -P 16 -I{} sh -c 'tar -C "$1" -cf - "$2" | tar -C "$3" -xf -' _ "$SRC/$split" {} "$DEST/$split")
  fi
done
for split in train val; do  # a copy with fewer class directories than the source is not a copy
  want=$(find "$SRC/$split" -mindepth 1 -maxdepth 1 -type d | wc -l)
  got=$(find "$DEST/$split" -mindepth 1 -maxdepth 1 -type d | wc -l)
  [ "$want" = "$got" ] || { echo "$0: $DEST/$split has $got class directories, $SRC/$split $want" >&2; exit 1; }
done
touch "$DEST/.staged"
echo "staged $SRC -> $DEST in $(( $(date +%s) - start ))s ($(du -sh "$DEST" | cut -f1))"
