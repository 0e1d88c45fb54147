"""GPU check and benchmark, one script for a short lease of a GPU machine (see DEVELOPERS.md):

    python bench/gpu_kernels.py [--out bench/results/gpu.json] [--new-tokens 64] [--sections check layers int8 decode]

1. the autotuned Triton W4A16/W8A16 kernel against the reference on large shapes;
2. per-layer times at batch 1–16 on 8192×8192 (the issue's anchor shape): fp16 and bf16
   cuBLAS, torch's int4 kernel (``_weight_int4pack_mm``, group 128, bf16), lowbit's W4 g128
   (symmetric and asymmetric; at one token also each of the two GEMV kernels forced, and
   which one the per-shape timing picked) and W8 per channel, and the int8 tensor-core product
   (``torch._int_mm``, W8A8) against fp16 at prefill-sized batches;
3. decode tokens/s of a Llama-2-7B-shaped model with random weights (fp16, W8, W4) through
   transformers' ``generate``, lowbit's loop run eagerly and lowbit's loop with CUDA graphs,
   beside the roofline's prediction at the measured copy bandwidth.

Every section runs in its own try block, so one failure leaves the rest measured. Timings are
medians of ``triton.testing.do_bench``; all ratios are taken within this one process.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lowbit.algorithms import rtn_quantize  # noqa: E402
from lowbit.kernels import triton_gemm as tg  # noqa: E402
from lowbit.modules import QuantLinear  # noqa: E402
from lowbit.methods import DEFAULT_SKIP  # noqa: E402
from lowbit.modules.swap import linear_layers, set_module  # noqa: E402
from lowbit.numerics import QuantSpec  # noqa: E402

W4 = QuantSpec(bits=4, group_size=128)
W4_ASYM = QuantSpec(bits=4, group_size=128, symmetric=False)
W8 = QuantSpec(bits=8, granularity="channel", group_size=None)


def bench(fn) -> float:
    """Median milliseconds of fn."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def section(results: dict, name: str, fn) -> None:
    start = time.perf_counter()
    print(f"\n== {name}", flush=True)
    try:
        results[name] = fn()
    except Exception as err:  # noqa: BLE001 - the script must go on to the next section
        traceback.print_exc()
        results[name] = {"error": f"{type(err).__name__}: {err}"}
    print(f"   ({time.perf_counter() - start:.1f} s)", flush=True)


def quant_layer(n: int, k: int, spec: QuantSpec, seed: int = 0) -> QuantLinear:
    g = torch.Generator(device="cuda").manual_seed(seed)
    weight = torch.randn(n, k, generator=g, device="cuda") * 0.02
    return QuantLinear(rtn_quantize(weight, spec))


def check_autotuned() -> list[dict]:
    rows = []
    for spec in (W4, W4_ASYM, W8):
        for n, k in ((8192, 8192), (4096, 11008)):
            module = quant_layer(n, k, spec)
            kernel = tg.TritonLinear(module, torch.float16)
            for m in (1, 16):
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                ref = tg.reference_gemm(x, module)
                err = (kernel(x).float() - ref).abs().max().item() / ref.abs().max().item()
                rows.append({"spec": spec.describe(), "shape": [n, k], "tokens": m, "max_err_rel_to_max": err})
                print(f"   {spec.describe():<22} {n}x{k} M={m:<2} max |err| / max |ref| = {err:.2e}", flush=True)
                assert err < 5e-3, f"kernel differs from the reference: {err}"
    return rows


def int4pack_fn(n: int, k: int, x_bf16: torch.Tensor):
    """torch's built-in int4 kernel (group 128): timing only, on random codes."""
    codes = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
    packed = torch.ops.aten._convert_weight_to_int4pack(codes, 8)
    scales_zeros = torch.randn(k // 128, n, 2, device="cuda", dtype=torch.bfloat16)
    return lambda: torch.ops.aten._weight_int4pack_mm(x_bf16, packed, 128, scales_zeros)


def layer_times(n: int = 8192, k: int = 8192) -> list[dict]:
    w16 = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
    wb16 = w16.to(torch.bfloat16)
    ours = {label: tg.TritonLinear(quant_layer(n, k, spec), torch.float16) for label, spec in
            (("lowbit W4 g128 sym", W4), ("lowbit W4 g128 asym", W4_ASYM), ("lowbit W8 channel", W8))}
    rows = []
    for m in (1, 2, 4, 8, 16):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        xb = x.to(torch.bfloat16)
        times = {"fp16 cuBLAS": bench(lambda: F.linear(x, w16)), "bf16 cuBLAS": bench(lambda: F.linear(xb, wb16))}
        try:
            times["torch int4pack g128 (bf16)"] = bench(int4pack_fn(n, k, xb))
        except Exception as err:  # noqa: BLE001
            print(f"   torch int4pack unavailable: {err}", flush=True)
        for label, layer in ours.items():
            times[label] = bench(lambda layer=layer: layer(x))
        if m == 1:  # both one-token W4 kernels, forced (the rows above use the per-shape pick)
            layer = ours["lowbit W4 g128 sym"]
            try:
                for layout in ("pairs", "words"):
                    tg.GEMV_LAYOUT = layout
                    times[f"lowbit W4 g128 sym, {layout} GEMV"] = bench(lambda: layer(x))
            finally:  # the later sections use the per-shape pick again, even after a failure here
                tg.GEMV_LAYOUT = "auto"
        base = times["fp16 cuBLAS"]
        row = {"tokens": m, "ms": times, "speedup_vs_fp16": {key: base / value for key, value in times.items()},
               "gemv_picks": {str(key): value for key, value in tg._GEMV_PICKS.items()}}
        rows.append(row)
        print(f"   M={m:<2} " + "  ".join(f"{key} {1000 * value:.1f} us ({base / value:.2f}x)" for key, value in times.items()), flush=True)
    return rows


def int8_times(n: int = 8192, k: int = 8192) -> list[dict]:
    """W8A8 on the int8 tensor cores (torch._int_mm, int32 out) vs fp16, plus lowbit's W8A8Linear
    end to end (per-token activation quantisation and the scale product included)."""
    from lowbit.modules.int8 import W8A8Linear

    linear = torch.nn.Linear(k, n, bias=False, device="cuda")
    module = W8A8Linear.from_linear(linear, "token").cuda()
    w16 = linear.weight.detach().half()
    wq = torch.randint(-127, 128, (k, n), dtype=torch.int8, device="cuda")
    rows = []
    for m in (1, 16, 32, 512, 4096):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        xq = torch.randint(-127, 128, (max(m, 17), k), dtype=torch.int8, device="cuda")
        fp16 = bench(lambda: F.linear(x, w16))
        int_mm = bench(lambda: torch._int_mm(xq, wq))
        layer = bench(lambda: module(x))
        rows.append({"tokens": m, "fp16_ms": fp16, "int_mm_ms": int_mm, "w8a8_linear_ms": layer})
        print(f"   M={m:<5} fp16 {1000 * fp16:8.1f} us  _int_mm {1000 * int_mm:8.1f} us ({fp16 / int_mm:.2f}x)  "
              f"W8A8Linear {1000 * layer:8.1f} us ({fp16 / layer:.2f}x)", flush=True)
    return rows


def copy_bandwidth() -> float:
    """GB/s of a device-to-device copy, counting bytes read and written."""
    a = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a))
    return 2 * a.numel() / (ms / 1000) / 1e9


def llama_7b(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                         vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    return model.eval()


def quantize_inplace(model, spec: QuantSpec) -> None:
    for name, linear in linear_layers(model, DEFAULT_SKIP):
        set_module(model, name, QuantLinear(rtn_quantize(linear.weight.detach(), spec), None if linear.bias is None else linear.bias.detach()))
    tg.use_triton_kernels(model, torch.float16)


def decode(new_tokens: int) -> dict:
    from lowbit.analysis.roofline import decode_cost
    from lowbit.inference.generate import generate

    bandwidth = copy_bandwidth()
    print(f"   copy bandwidth {bandwidth:.0f} GB/s", flush=True)
    prompt = torch.randint(0, 32000, (1, 32), generator=torch.Generator().manual_seed(0))
    rows = []
    float_model = llama_7b()
    reference_tokens = None
    for variant in ("fp16", "W8 channel", "W4 g128 sym"):
        if variant == "fp16":
            model = float_model
        else:
            model = copy.deepcopy(float_model)
            quantize_inplace(model, W8 if variant.startswith("W8") else W4)
        torch.cuda.synchronize()
        cost = decode_cost(model, 32 + new_tokens // 2)
        row = {"variant": variant, "weight_bytes": cost.weight_bytes, "predicted_tokens_per_second": bandwidth * 1e9 / cost.weight_bytes}
        if variant == "fp16":
            with torch.no_grad():
                model.generate(prompt.cuda(), max_new_tokens=4, do_sample=False)
                torch.cuda.synchronize()
                start = time.perf_counter()
                out = model.generate(prompt.cuda(), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
                torch.cuda.synchronize()
            row["transformers_generate_tokens_per_second"] = new_tokens / (time.perf_counter() - start)  # prefill included
            reference_tokens = out[0, 32:].tolist()
        generate(model, prompt[:, :8], max_new_tokens=4, cuda_graph=False)  # warm-up, autotuning
        eager = generate(model, prompt, max_new_tokens=new_tokens, cuda_graph=False)
        graph = generate(model, prompt, max_new_tokens=new_tokens, cuda_graph=True)
        row.update({"eager_tokens_per_second": eager.decode_tokens_per_second, "graph_tokens_per_second": graph.decode_tokens_per_second,
                    "graph_mode": graph.mode, "capture_seconds": graph.capture_seconds, "prefill_seconds": graph.prefill_seconds,
                    "graph_equals_eager": graph.tokens == eager.tokens,
                    "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9})
        if variant == "fp16":
            row["eager_equals_transformers"] = eager.tokens == reference_tokens
        rows.append(row)
        print("   " + json.dumps(row), flush=True)
        if model is not float_model:
            del model
        torch.cuda.empty_cache()
    fp16 = rows[0]
    for row in rows:
        row["graph_speedup_vs_fp16_graph"] = row["graph_tokens_per_second"] / fp16["graph_tokens_per_second"]
    return {"copy_bandwidth_gbps": bandwidth, "prompt_tokens": 32, "new_tokens": new_tokens, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "bench/results"), "gpu.json"))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--sections", nargs="+", default=["check", "layers", "int8", "decode"],
                        choices=["check", "layers", "int8", "decode"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_kernels.py needs a CUDA GPU")
    import triton

    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    print(json.dumps(results), flush=True)
    if "check" in args.sections:
        section(results, "autotuned kernel vs reference", check_autotuned)
    if "layers" in args.sections:
        section(results, "per-layer times 8192x8192", layer_times)
    if "int8" in args.sections:
        section(results, "W8A8 int8 tensor cores 8192x8192", int8_times)
    if "decode" in args.sections:
        section(results, "decode Llama-2-7B-shaped", lambda: decode(args.new_tokens))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
