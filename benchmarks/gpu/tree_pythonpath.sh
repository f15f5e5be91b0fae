# Sourced by the GPU scripts (needs ROOT, the checkout): import this tree without installing it. models/ and
# solvers/ map into nitsum_opt (see pyproject), so the tree is linked into a temporary folder PP, which goes first
# on PYTHONPATH (vLLM in /tmp/site, when installed there, last) and is removed when the calling script exits.
# Run Python from "$PP", never from $ROOT: ./nitsum_opt there lacks the models mapping.
PP=$(mktemp -d /tmp/nitsum_pp.XXXXXX)
trap 'rm -rf "$PP"' EXIT
mkdir -p "$PP/nitsum_opt"
for f in "$ROOT"/nitsum_opt/*; do ln -s "$f" "$PP/nitsum_opt/"; done
ln -s "$ROOT/models" "$PP/nitsum_opt/models"
ln -s "$ROOT/solvers" "$PP/nitsum_opt/solvers"
ln -s "$ROOT/nitsum_runtime" "$PP/nitsum_runtime"
export PYTHONPATH="$PP${PYTHONPATH:+:$PYTHONPATH}"
if [ -d /tmp/site ]; then export PYTHONPATH="$PYTHONPATH:/tmp/site"; fi
