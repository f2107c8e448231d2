# Sourced by the GPU scripts (device_session.sh, distributed/run_proof.sh): $OUT made, the carried
# wheels (.whl from ../shared/device/wheels.sh) installed into /tmp/site when present, and the
# repository on PYTHONPATH.
OUT=${OUT:-/tmp/vramfit-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
  export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
fi
export PYTHONUNBUFFERED=1
