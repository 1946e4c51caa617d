# Sourced by the lease scripts that use onnxruntime-gpu (gpu_verify_ort.sh, gpu_ort_probe.sh) with
# ROOT and stamp() set. ort_unpack_start: copies the parts this call carries (.ortslim*/) next to
# those an earlier call of the same warm machine left in /tmp/ortw, and, where all NPARTS parts are
# there, unpacks them into /tmp/site in the background (touching /tmp/site/.done when complete;
# `wait` for it) and sets ort_ready=1; else says so and sets ort_ready=0.
ort_unpack_start() {
  local d
  for d in "$ROOT"/.ortslim*/; do [[ -d "$d" ]] && mkdir -p /tmp/ortw && cp "$d"/* /tmp/ortw/; done
  ort_ready=0
  if [[ "$(ls /tmp/ortw/ort_slim.tar.xz.part* 2>/dev/null | wc -l)" != "$(cat /tmp/ortw/NPARTS 2>/dev/null)" ]]; then
    stamp "onnxruntime-gpu: not every part is here (was the machine the same warm one?)"
    return 0
  fi
  mkdir -p /tmp/site
  (cat /tmp/ortw/ort_slim.tar.xz.part* | xz -d -T4 | tar -x -C /tmp/site && touch /tmp/site/.done) &
  ort_ready=1
}
