"""Does onnxruntime's CUDA graph (provider option enable_cuda_graph) shorten one image's
extraction (issue 7: one image's DFF in under 3 ms, of which VGG-16 to conv5_3 took 0.62 ms)?

Times one 224 x 224 image through the random-weight VGG-16 extractor (uint8 NHWC input, conv5_3
out, left on the device) four ways, p50 / p90 over --reps runs, each ended by a wait:
  0. a binding made per run (``bind_cpu_input``, output in onnxruntime's arena): what the
     extractor does, without its Python around it;
  1. the extractor as dff uses it (``ext.run(x, device_output=True)``);
  2. the same session with input and output bound once to fixed device buffers (the input
     refreshed in place each run);
  3. as 2 on a session with ``enable_cuda_graph=1``: the whole network one graph launch.
and checks that 3 gives 2's values. Prints what fails (a node onnxruntime keeps on the CPU
stops the capture) instead of raising.

    python3 benchmarks/ort_cuda_graph_probe.py [--reps 300]
"""
import argparse
import time
import warnings

import _common  # noqa: F401  (dffkit from an install or this checkout)
import numpy as np


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=300)
    args = p.parse_args(argv)

    import onnxruntime as ort
    from PIL import Image

    from dffkit.features import FeatureExtractor

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8))

    def timed(name, fn, sync):
        for _ in range(10):
            fn()
        sync()
        ts = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        ts = 1e3 * np.asarray(ts)
        print(f"{name:62s} p50 {np.median(ts):7.3f} ms  p90 {np.percentile(ts, 90):7.3f} ms", flush=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ext = FeatureExtractor("vgg16", providers="cuda", image_size=224, batch_size=1)
    x = ext.resize_images([img])
    print(f"onnxruntime {ort.__version__}; extractor {ext.model_name} layer {ext.layer}; input {x.shape} {x.dtype}")
    def per_run_binding():  # what ext.run does, without its Python
        binding = ext.session.io_binding()
        binding.bind_cpu_input(ext.input_name, x)
        binding.bind_output(ext.output_name, "cuda", 0)
        ext.session.run_with_iobinding(binding)
        return binding.get_outputs()[0]

    timed("0. a binding made per run (bind_cpu_input), output in the arena", per_run_binding, lambda: None)
    timed("1. ext.run(x, device_output=True)", lambda: ext.run(x, device_output=True), lambda: None)

    def fixed(session):
        xin = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
        shape = ext.run(x).shape
        yout = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, "cuda", 0)
        binding = session.io_binding()
        binding.bind_ortvalue_input(ext.input_name, xin)
        binding.bind_ortvalue_output(ext.output_name, yout)

        def run():
            xin.update_inplace(x)
            session.run_with_iobinding(binding)
        return run, yout

    run2, y2 = fixed(ext.session)
    timed("2. fixed device input and output, same session", run2, lambda: None)
    ref = y2.numpy()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gext = FeatureExtractor("vgg16", providers="cuda", image_size=224, batch_size=1,
                                    provider_options={"enable_cuda_graph": 1})
        run3, y3 = fixed(gext.session)
        timed("3. as 2 with enable_cuda_graph=1", run3, lambda: None)
        got = y3.numpy()
        print(f"graph output equals the plain session's: {np.array_equal(got, ref)} "
              f"(max abs diff {float(np.max(np.abs(got - ref))):.3g}, max {float(np.max(np.abs(ref))):.3g})")
        x2 = ext.resize_images([Image.fromarray(np.random.default_rng(1).integers(0, 256, (224, 224, 3), dtype=np.uint8))])
        # a new image through the graph: the captured input buffer refreshed in place
        x[...] = x2
        run3()
        new_graph = y3.numpy()
        new_plain = ext.run(x)
        print(f"a second image through the graph equals the plain extractor's: {np.array_equal(new_graph, new_plain)}")
    except Exception as e:  # noqa: BLE001 - the probe reports what onnxruntime says
        print(f"3. enable_cuda_graph failed: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
