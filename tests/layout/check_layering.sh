#!/usr/bin/env bash
# Checks that no layer of the controller reaches up the data path: a file in
# userspace/<folder>/ includes only folders before it in this order, and the
# server uses the controller's lower layers only.
#   base < vmm < harvest < checkpoint < transport < {daemon, lab} < cli
# Usage: check_layering.sh [SOURCE_ROOT]
set -u
root=${1:-$(cd "$(dirname "$0")/../.." && pwd)}
cd "$root" || { echo "no source tree at $root"; exit 1; }

order=(base vmm harvest checkpoint transport)
declare -A allowed=(
  [base]="base"
  [vmm]="base vmm"
  [harvest]="base vmm harvest"
  [checkpoint]="base vmm harvest checkpoint"
  [transport]="base vmm harvest checkpoint transport"
  [daemon]="${order[*]} daemon"
  [lab]="${order[*]} lab"
  [cli]="${order[*]} daemon lab cli"
  [server]="${order[*]}"
)
folders="base vmm harvest checkpoint transport daemon lab cli"
server_headers=$(cd server && ls -- *.h)

violations=0
report() { echo "layering: $1"; violations=$((violations + 1)); }
check_file() {  # FILE LAYER
  local file=$1 layer=$2 line target top
  local pattern='^[[:space:]]*#[[:space:]]*include[[:space:]]*"([^"]*)"'
  while IFS= read -r line; do
    [[ $line =~ $pattern ]] || continue
    target=${BASH_REMATCH[1]}
    if [[ $target == */* ]]; then
      top=${target%%/*}
      if [[ " $folders " == *" $top "* ]] && [[ " ${allowed[$layer]} " != *" $top "* ]]; then
        report "$file ($layer) includes $target"
      fi
    elif [ "$layer" != server ]; then
      # A bare name: the schema, bpf, or (wrongly) a server header or a
      # controller header without its folder.
      if [ "$layer" != cli ] && [[ $'\n'"$server_headers"$'\n' == *$'\n'"$target"$'\n'* ]]; then
        report "$file ($layer) includes the server's $target"
      fi
      if [ -f "userspace/$layer/$target" ]; then
        report "$file includes $target without its folder (write \"$layer/$target\")"
      fi
    fi
  done < <(grep -E '^[[:space:]]*#[[:space:]]*include' "$file")
}

checked=0
for layer in $folders; do
  [ -d "userspace/$layer" ] || { report "userspace/$layer is missing"; continue; }
  for file in userspace/"$layer"/*.h userspace/"$layer"/*.cc; do
    [ -f "$file" ] || continue
    check_file "$file" "$layer"
    checked=$((checked + 1))
  done
done
for file in server/*.h server/*.cc; do
  check_file "$file" server
  checked=$((checked + 1))
done
# Nothing may be left at the top of userspace/ but the build file.
for file in userspace/*; do
  [ -d "$file" ] || [ "$(basename "$file")" = CMakeLists.txt ] || report "$file is outside the layer folders"
done
echo "layering: $checked files checked, $violations violations"
[ "$violations" -eq 0 ]
