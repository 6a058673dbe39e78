"""Reference timings for `weir bench engine --reference`: the published StreamDiffusionV2 pipeline
(`streamdiffusionv2==0.1.1`, top-level packages `models` / `streamv2v`), driven through its own classes
at the full 1.3B size with random weights, on CUDA in bf16.

What is timed (medians of device-synchronised wall time, after warm-up):
    dit      one `CausalStreamInferencePipeline.inference_stream` per chunk (one latent frame), after the
             reference's 2-frame prefill (`prepare`), for each steps count n (the stream batch holds n rows)
    vae_enc  `WanVAE_.stream_encode` of 4 frames (after its first 1+4-frame call)
    vae_dec  `WanVAE_.stream_decode` of 1 latent (after its first 2-latent call)
`reference_rows` returns plain dicts; `fps_est = 4000 / (dit + vae_enc + vae_dec)` is the serial
end-to-end rate those stage times allow (the reference runs its stages back to back on one GPU).

Importing the reference. Its DiT module imports diffusers only for `ModelMixin` / `ConfigMixin`
(plain base classes here: the model is built directly, never from a config folder), and its package
`__init__` pulls in the T5 tokenizer (transformers, ftfy, regex), which is never called here. When
one of those imports fails (a GPU host without diffusers, or with an incompatible release), the
function `import_reference` puts a minimal stand-in for exactly that module into `sys.modules` and
retries; the stand-ins are listed in the rows (`stubs`) and stay installed only in this process.
Nothing of the reference's code is copied; the model is assembled the way tests/reference_oracle.py
does it (the stock wrappers would load checkpoint folders and the 5.7B T5).
"""

from __future__ import annotations

import statistics
import sys
import time
import types

import torch

from stages.config import DIT_PRESETS, DiTConfig, StreamConfig

_STUBBABLE = ("diffusers", "transformers", "ftfy", "regex")


def _stub_module(name: str) -> None:
    """Install a minimal stand-in for `name` (one of _STUBBABLE) and its submodules the reference uses."""
    if name == "diffusers":
        class ConfigMixin:  # noqa: D401 - stand-in: the model is built directly, not from a config
            """Stand-in for diffusers' ConfigMixin (no config bookkeeping needed here)."""

        class ModelMixin(torch.nn.Module):
            """Stand-in for diffusers' ModelMixin: a plain nn.Module."""

        def register_to_config(init):
            return init

        pkg = types.ModuleType("diffusers")
        cfg = types.ModuleType("diffusers.configuration_utils")
        cfg.ConfigMixin, cfg.register_to_config = ConfigMixin, register_to_config
        models = types.ModuleType("diffusers.models")
        modeling = types.ModuleType("diffusers.models.modeling_utils")
        modeling.ModelMixin = ModelMixin
        pkg.configuration_utils, pkg.models, models.modeling_utils = cfg, models, modeling
        sys.modules.update({
            "diffusers": pkg, "diffusers.configuration_utils": cfg,
            "diffusers.models": models, "diffusers.models.modeling_utils": modeling,
        })
    elif name == "transformers":
        mod = types.ModuleType("transformers")

        class AutoTokenizer:
            @staticmethod
            def from_pretrained(*args, **kwargs):
                raise RuntimeError("transformers stand-in: the reference bench never tokenizes")

        mod.AutoTokenizer = AutoTokenizer
        sys.modules["transformers"] = mod
    elif name == "ftfy":
        mod = types.ModuleType("ftfy")
        mod.fix_text = lambda text, **kwargs: text
        sys.modules["ftfy"] = mod
    elif name == "regex":
        import re

        sys.modules["regex"] = re
    else:  # pragma: no cover - guarded by the caller
        raise ValueError(name)


def import_reference() -> tuple[types.SimpleNamespace, list[str]]:
    """The reference classes the bench drives, and the names of the modules that had to be stubbed."""
    stubs: list[str] = []
    last_error: Exception | None = None
    for _ in range(len(_STUBBABLE) + 1):
        try:
            from models.wan import causal_stream_inference
            from models.wan.causal_model import CausalWanModel
            from models.wan.flow_match import FlowMatchScheduler
            from models.wan.wan_base.modules.vae import WanVAE_
            from models.wan.wan_wrapper import CausalWanDiffusionWrapper

            return types.SimpleNamespace(
                Pipeline=causal_stream_inference.CausalStreamInferencePipeline,
                CausalWanModel=CausalWanModel,
                FlowMatchScheduler=FlowMatchScheduler,
                WanVAE_=WanVAE_,
                Wrapper=CausalWanDiffusionWrapper,
            ), stubs
        except Exception as exc:  # noqa: BLE001 - find which optional import broke, stub it, retry
            last_error = exc
            missing = _broken_dependency(exc)
            if missing is None or missing in stubs:
                break
            for mod in [m for m in sys.modules if m == "models" or m.startswith(("models.", missing + "."))]:
                del sys.modules[mod]
            sys.modules.pop(missing, None)
            _stub_module(missing)
            stubs.append(missing)
    raise RuntimeError(
        f"cannot import the reference package (streamdiffusionv2==0.1.1; stubbed {stubs}): "
        f"{type(last_error).__name__}: {last_error}"
    ) from last_error


def _broken_dependency(exc: BaseException) -> str | None:
    """Which stubbable package an import error came from (by module name, else by traceback)."""
    name = getattr(exc, "name", None) or ""
    for dep in _STUBBABLE:
        if name == dep or name.startswith(dep + "."):
            return dep
    tb = exc.__traceback__
    files = []
    while tb is not None:
        files.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    for path in reversed(files):
        for dep in _STUBBABLE:
            if f"/{dep}/" in path or path.endswith(f"/{dep}.py"):
                return dep
    return None


def _sync() -> None:
    torch.cuda.synchronize()


def _time_ms(fn, *, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(1000 * (time.perf_counter() - t0))
    return times


def assemble_reference_pipeline(ref, model, cfg: DiTConfig, *, height: int, width: int,
                                stream_cfg: StreamConfig, text_BST: torch.Tensor, device: torch.device | str):
    """The published CausalStreamInferencePipeline around a built `model`, without its __init__ (which
    loads files): `ref` names its Wrapper, Pipeline and FlowMatchScheduler classes. Used by this
    benchmark and by the parity tests' oracle."""
    wrapper = ref.Wrapper.__new__(ref.Wrapper)
    torch.nn.Module.__init__(wrapper)
    wrapper.model = model
    wrapper.uniform_timestep = False
    wrapper.scheduler = ref.FlowMatchScheduler(shift=8.0, sigma_min=0.0, extra_one_step=True)
    wrapper.scheduler.set_timesteps(1000, training=True)
    wrapper.seq_len = 32760
    wrapper.post_init()

    pipe = ref.Pipeline.__new__(ref.Pipeline)
    torch.nn.Module.__init__(pipe)
    pipe.device = device
    pipe.generator = wrapper
    object.__setattr__(pipe, "text_encoder", lambda text_prompts: {"prompt_embeds": text_BST.clone()})
    pipe.denoising_step_list = torch.tensor(stream_cfg.timesteps, dtype=torch.long, device=device)
    pipe.scheduler = wrapper.get_scheduler()
    pipe.num_transformer_blocks = cfg.num_layers
    pipe.num_heads = cfg.num_heads
    pipe.height = height // 16 * 2
    pipe.width = width // 16 * 2
    pipe.frame_seq_length = (height // 16) * (width // 16)
    pipe.num_kv_cache = stream_cfg.num_kv_cache_frames
    pipe.kv_cache_length = pipe.frame_seq_length * pipe.num_kv_cache
    pipe.num_sink_tokens = stream_cfg.num_sink_frames
    pipe.adapt_sink_threshold = stream_cfg.adapt_sink_threshold
    pipe.conditional_dict = None
    pipe.kv_cache1 = None
    pipe.kv_cache2 = None
    pipe.hidden_states = None
    pipe.block_x = None
    pipe.num_frame_per_block = 1
    return pipe


def _build_pipeline(ref, model, cfg: DiTConfig, *, height: int, width: int, num_steps: int,
                    text_BST: torch.Tensor, device: torch.device):
    """A benchmark session: reset the eviction state the reference keeps on its modules, then assemble."""
    for block in model.blocks:
        block.self_attn.evict_idx = None
    return assemble_reference_pipeline(ref, model, cfg, height=height, width=width,
                                       stream_cfg=StreamConfig(num_steps=num_steps), text_BST=text_BST, device=device)


@torch.no_grad()
def reference_dit_rows(ref, *, model_name: str, resolutions: list[tuple[int, int]], steps: list[int],
                       chunks: int, warmup: int, device: torch.device, dtype: torch.dtype) -> list[dict]:
    cfg = DIT_PRESETS[model_name]
    with torch.device(device):
        model = ref.CausalWanModel(
            dim=cfg.dim, ffn_dim=cfg.ffn_dim, num_heads=cfg.num_heads, num_layers=cfg.num_layers,
            in_dim=cfg.in_dim, out_dim=cfg.out_dim, text_len=cfg.text_len, freq_dim=cfg.freq_dim, eps=cfg.eps,
        )
    model = model.to(dtype).eval().requires_grad_(False)
    with torch.no_grad():  # the published init zeroes the head: give it weights so outputs are not x_t
        model.head.head.weight.normal_(0.0, cfg.dim**-0.5)
    gen = torch.Generator(device=device).manual_seed(0)
    text_BST = torch.randn(1, cfg.text_len, cfg.text_dim, generator=gen, device=device).to(dtype)
    rows = []
    for height, width in resolutions:
        h, w = height // 8, width // 8
        for n in steps:
            pipe = _build_pipeline(ref, model, cfg, height=height, width=width, num_steps=n,
                                   text_BST=text_BST, device=device)
            fp = pipe.frame_seq_length
            prefill = torch.randn(1, 2, cfg.in_dim, h, w, generator=gen, device=device).to(dtype)  # BFCHW
            pipe.prepare(text_prompts=["weir"], device=device, dtype=dtype, noise=prefill,
                         current_start=0, current_end=2 * fp)
            position = {"start": 2 * fp}

            def one_chunk(pipe=pipe, fp=fp, h=h, w=w, position=position):
                start = position["start"]
                if start // fp >= 50:  # the reference session loop's RoPE reset
                    start = pipe.kv_cache_length - fp
                chunk = torch.randn(1, 1, cfg.in_dim, h, w, generator=gen, device=device).to(dtype)
                pipe.inference_stream(noise=chunk, current_start=start, current_end=start + fp,
                                      current_step=700)
                position["start"] = start + fp

            times = _time_ms(one_chunk, warmup=warmup + n, iters=chunks)
            rows.append(dict(kind="dit", model=model_name, resolution=f"{height}x{width}", steps=n,
                             ms=statistics.median(times), ms_min=min(times), iters=len(times)))
            print(f"# reference dit {height}x{width} steps={n}: {rows[-1]['ms']:.1f} ms", file=sys.stderr)
            del pipe
            torch.cuda.empty_cache()
    del model
    torch.cuda.empty_cache()
    return rows


@torch.no_grad()
def reference_vae_rows(ref, *, resolutions: list[tuple[int, int]], chunks: int, warmup: int,
                       device: torch.device, dtype: torch.dtype) -> list[dict]:
    vae_cfg = dict(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                   temperal_downsample=[False, True, True], dropout=0.0)
    with torch.device(device):
        vae = ref.WanVAE_(**vae_cfg)
    vae = vae.to(dtype).eval().requires_grad_(False)
    mean = torch.zeros(16, device=device, dtype=dtype)
    inv_std = torch.ones(16, device=device, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(1)
    rows = []
    for height, width in resolutions:
        vae.first_encode, vae.first_decode = True, True
        first = torch.rand(1, 3, 5, height, width, generator=gen, device=device).to(dtype) * 2 - 1
        vae.stream_encode(first, None)
        frames = torch.rand(1, 3, 4, height, width, generator=gen, device=device).to(dtype) * 2 - 1
        enc = _time_ms(lambda vae=vae, x=frames: vae.stream_encode(x, None), warmup=warmup, iters=chunks)
        z2 = torch.randn(1, 16, 2, height // 8, width // 8, generator=gen, device=device).to(dtype)
        vae.stream_decode(z2, [mean, inv_std])
        z1 = z2[:, :, :1].contiguous()
        dec = _time_ms(lambda vae=vae, z=z1: vae.stream_decode(z, [mean, inv_std]), warmup=warmup, iters=chunks)
        res = f"{height}x{width}"
        rows.append(dict(kind="vae_enc", resolution=res, ms=statistics.median(enc), ms_min=min(enc), iters=len(enc)))
        rows.append(dict(kind="vae_dec", resolution=res, ms=statistics.median(dec), ms_min=min(dec), iters=len(dec)))
        print(f"# reference wan vae {res}: enc {rows[-2]['ms']:.1f} ms, dec {rows[-1]['ms']:.1f} ms", file=sys.stderr)
    del vae
    torch.cuda.empty_cache()
    return rows


def reference_rows(*, model_name: str = "wan-1.3b", resolutions: list[tuple[int, int]] = ((480, 832), (512, 512)),
                   steps: list[int] = (1, 2, 3, 4), chunks: int = 10, warmup: int = 3,
                   device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Time the reference DiT (per chunk, per steps count) and Wan VAE (per 4 frames) on CUDA.

    Returns the dit / vae_enc / vae_dec rows plus one `e2e` row per (resolution, steps) with
    fps_est = 4000 / (dit + vae_enc + vae_dec). Raises RuntimeError without CUDA or the package.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("the reference timing needs a CUDA device")
    ref, stubs = import_reference()
    dev = torch.device(device)
    resolutions = [tuple(r) for r in resolutions]
    dit = reference_dit_rows(ref, model_name=model_name, resolutions=resolutions, steps=list(steps),
                             chunks=chunks, warmup=warmup, device=dev, dtype=dtype)
    vae = reference_vae_rows(ref, resolutions=resolutions, chunks=chunks, warmup=warmup, device=dev, dtype=dtype)
    by = {(r["kind"], r["resolution"]): r["ms"] for r in vae}
    e2e = []
    for r in dit:
        total = r["ms"] + by[("vae_enc", r["resolution"])] + by[("vae_dec", r["resolution"])]
        e2e.append(dict(kind="e2e", model=model_name, resolution=r["resolution"], steps=r["steps"],
                        ms=total, fps_est=4000.0 / total))
    device_name = torch.cuda.get_device_name(dev)
    rows = dit + vae + e2e
    for r in rows:
        r.update(device=device_name, dtype=str(dtype).removeprefix("torch."), stubs=",".join(stubs))
    return rows
