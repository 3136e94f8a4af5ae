"""Peer baseline: llm-compressor (vllm-project/llm-compressor) Wanda / SparseGPT.

Written against llmcompressor 0.14.0.1 (+ compressed-tensors, transformers 5.x).

Public API
----------
``available() -> bool``
    True when llmcompressor (and ``datasets``) can be imported; never raises.

``run_llmcompressor(model, method, sparsity, pattern, calib_ids,
                    targets_regex=None, *, quiet=True, batch_size=1) -> float``
    Prune ``model`` IN PLACE with ``llmcompressor.oneshot`` and
    ``WandaPruningModifier`` (method="wanda") or ``SparseGPTModifier``
    (method="sparsegpt", block_size=128, dampening_frac=0.01), using exactly
    the token batches in ``calib_ids`` (int64 [n_samples, seqlen]).
    ``pattern`` is "unstructured" (mask_structure "0:0") or "2:4".
    Returns the wall-clock seconds of the ``oneshot`` call only.

What is pruned
--------------
The modifiers' default ``targets=["Linear"]`` with ``ignore=["re:.*lm_head"]``,
i.e. every nn.Linear of the decoder blocks (q/k/v/o_proj, gate/up/down_proj)
and NOT lm_head (for tied models such as SmolLM2 pruning lm_head would also
prune the input embeddings).  ``targets_regex`` (a str or list of str) replaces
the targets by ``re:<regex>`` patterns matched with ``re.match`` (prefix
anchored) against full module names, e.g.
``r"model\\.layers\\.\\d+\\.mlp\\."``; every Linear inside a matched module
is pruned (lm_head stays ignored).

llm-compressor facts / pitfalls handled here (0.14)
----------------------------------------------------
* For N:M patterns the ``sparsity`` value is ignored by both modifiers: 2:4
  always prunes exactly 2 of every 4 consecutive input columns (50 %).
  (SparseGPT may leave a *third* exact zero in a group when the weight was
  already 0 and received no error update: 3 of 26.5M groups on SmolLM2.)
* Unstructured Wanda prunes int(sparsity * in_features) weights per output
  row; unstructured SparseGPT thresholds per 128-column block (``<=``), so it
  lands a hair above the target (e.g. 0.5002).
* ``batch_size`` > 1 is faster on CPU and mathematically equivalent, but float
  rounding changes SparseGPT's masks slightly (about 3 % of mask entries
  differed after 3 layers); keep the default 1 for llm-compressor parity.
* Calibration: a pre-tokenized ``datasets.Dataset`` (has an ``input_ids``
  column) is used as-is, no re-tokenization.  With
  ``shuffle_calibration_samples=False`` llm-compressor uses a
  ``LengthAwareSampler`` (argsort by length, descending); with equal lengths
  the order could in principle be permuted (observed: original row order),
  and the set of samples/tokens is always exactly ``calib_ids``.  batch_size=1 and the "truncation" collator with
  ``max_seq_length=seqlen`` leave every row untouched.
* ``oneshot`` insists on a processor whenever a dataset is given and would try
  ``AutoProcessor.from_pretrained(model.name_or_path)``; a no-op stand-in is
  passed instead (it is never used for a pre-tokenized dataset).
* ``Oneshot.validate_model`` calls ``AutoConfig.from_pretrained(
  model.config.name_or_path)``, which fails for models built from a config or
  loaded from GGUF.  The config is written to a temp dir and ``name_or_path``
  is pointed there for the duration of the call, then restored.
* The sequential pipeline (torch.fx-traced per decoder layer, activations
  propagated through the already pruned layers) wraps every module with
  compressed-tensors CPU "offloading" (``set_onload_device``) and never
  undoes it, and it splits tied lm_head/embedding parameters.  We call
  ``remove_dispatch`` afterwards, drop the per-instance ``forward`` attributes,
  re-tie tied embeddings and remove the ``save_pretrained`` wrapper that
  oneshot installs, so the model is a plain transformers model again
  (checked: same Parameter objects, same attn implementation / use_cache /
  eval mode / requires_grad, lm_head still tied to embed_tokens).
* Nothing is written to disk except a config.json in a TemporaryDirectory
  (output_dir=None, log_dir=None, and LLM_COMPRESSOR_LOG_FILE is unset during
  the call).  The global compression session is reset afterwards.
* Logging: llm-compressor logs through loguru (INFO line per pruned module,
  "No accelerator available" warnings, METRIC timings) to **stdout**, shows
  tqdm bars on stderr, and importing it normally calls loguru
  ``logger.remove()`` (drops every loguru handler in the process).
  ``quiet=True`` (default) imports it with LLM_COMPRESSOR_LOG_DISABLED=true
  (no handler reconfiguration; the METRIC level is registered by hand),
  disables the ``llmcompressor``/``compressed_tensors`` loguru loggers, the
  pipeline's tqdm bars and torch.fx's one-off "is_fx_tracing" warning for
  the duration of the call: nothing is printed.  ``quiet=False`` shows it all
  (installing llm-compressor's stdout handler if a quiet import skipped it).
* Speed (SmolLM2-135M, 32x256 tokens, 2-core CPU, idle machine): Wanda
  unstructured 0.5 ~21 s, SparseGPT 2:4 ~43 s.  Time is dominated by the
  batch_size=1 forward passes (each decoder layer runs twice per sample:
  calibrate, then propagate the pruned output).  On a shared 2-core box any
  concurrent torch job inflates this several-fold (seen: 93 s and 332 s).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
import tempfile
import time
from typing import Iterable

import torch

__all__ = ["available", "ensure_llmcompressor", "run_llmcompressor", "run_reap"]

PEER_DIR = os.path.expanduser("~/.cache/prunekit/peers/llmcompressor")
# what llmcompressor 0.14.0.1 needs beyond the project's own environment (torch, transformers, accelerate,
# pyarrow, pandas, numpy, ... are there): installed with --no-deps so that pip never touches torch
_EXTRA = ["llmcompressor==0.14.0.1", "compressed-tensors==0.19.0", "loguru", "datasets>=4.8.4", "dill",
          "multiprocess", "xxhash", "nvidia-ml-py"]


def ensure_llmcompressor() -> bool:
    """Make llmcompressor importable: the environment's own (the ``peers`` extra), else a --no-deps install into
    ``PEER_DIR`` (once). False when neither works (offline without the wheels)."""
    if available():
        return True
    if not os.path.isdir(os.path.join(PEER_DIR, "llmcompressor")):
        import subprocess

        try:
            subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", PEER_DIR,
                                   *_EXTRA])
        except (subprocess.CalledProcessError, OSError):
            return False
    if PEER_DIR not in sys.path:
        sys.path.insert(0, PEER_DIR)
    return available()

_METHODS = ("wanda", "sparsegpt")
_LOGGER_SETUP_SKIPPED = False  # set when we imported llmcompressor quietly
_PATTERNS = {"unstructured": "0:0", "0:0": "0:0", "2:4": "2:4"}


def available() -> bool:
    """True if llmcompressor's oneshot + pruning modifiers can be imported."""
    try:
        _import_llmc(quiet=True)
    except Exception:  # ImportError, or any error raised while importing
        return False
    return True


def _import_llmc(quiet: bool) -> dict:
    """Import what we need from llmcompressor without side effects on disk.

    Importing llmcompressor runs ``configure_logger()``, which (unless
    LLM_COMPRESSOR_LOG_DISABLED=true) calls ``loguru.logger.remove()`` -- i.e.
    drops *every* loguru handler in the process -- adds an INFO handler on
    stdout, and honours LLM_COMPRESSOR_LOG_FILE / LLM_COMPRESSOR_LOG_FILE_LEVEL
    (the latter alone makes it write ./llmcompressor.log).  File logging is
    always switched off here; with ``quiet`` the logger setup is skipped.
    """
    global _LOGGER_SETUP_SKIPPED
    env = {"LLM_COMPRESSOR_LOG_FILE": None, "LLM_COMPRESSOR_LOG_FILE_LEVEL": None}
    first_import = "llmcompressor" not in sys.modules
    if quiet:
        env["LLM_COMPRESSOR_LOG_DISABLED"] = "true"
    with _env(**env), _loguru_silenced(quiet):
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.core import reset_session
        from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
        from compressed_tensors.offload import remove_dispatch
        try:
            from llmcompressor.modifiers.pruning.reap import REAPPruningModifier
        except ImportError:  # versions before REAP
            REAPPruningModifier = None
    from loguru import logger

    if first_import and quiet:
        _LOGGER_SETUP_SKIPPED = True
    elif not quiet and _LOGGER_SETUP_SKIPPED:
        # a quiet import skipped llm-compressor's console handler: install it now
        from llmcompressor.logger import LoggerConfig, configure_logger

        with _env(**env):
            configure_logger(LoggerConfig())
        _LOGGER_SETUP_SKIPPED = False

    # configure_logger() normally registers the custom METRIC level that the
    # modifiers log with (loguru raises on unknown levels even when disabled).
    try:
        logger.level("METRIC")
    except ValueError:
        logger.level("METRIC", no=38, color="<yellow>", icon="📈")
    return dict(
        Dataset=Dataset,
        oneshot=oneshot,
        reset_session=reset_session,
        SparseGPTModifier=SparseGPTModifier,
        WandaPruningModifier=WandaPruningModifier,
        REAPPruningModifier=REAPPruningModifier,
        remove_dispatch=remove_dispatch,
    )


@contextlib.contextmanager
def _loguru_silenced(enabled: bool):
    """Disable the llmcompressor / compressed_tensors loguru loggers (if loguru
    is importable at all)."""
    names = ("llmcompressor", "compressed_tensors")
    try:
        from loguru import logger
    except Exception:
        logger = None
    if not enabled or logger is None:
        yield
        return
    for n in names:
        logger.disable(n)
    try:
        yield
    finally:
        for n in names:
            logger.enable(n)


class _NoProcessor:
    """Stand-in processor: oneshot requires one when a dataset is given, but a
    pre-tokenized dataset with the "truncation" collator never uses it."""

    def save_pretrained(self, *args, **kwargs):  # pragma: no cover - unused
        pass


@contextlib.contextmanager
def _env(**values):
    """Temporarily set (str) or unset (None) environment variables."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _quiet(enabled: bool):
    if not enabled:
        yield
        return
    import llmcompressor.pipelines.cache as _cache_mod
    import llmcompressor.pipelines.sequential.pipeline as _seq_mod

    patched = []
    for mod in (_seq_mod, _cache_mod):
        orig = getattr(mod, "tqdm", None)
        if orig is not None:
            patched.append((mod, orig))
            setattr(mod, "tqdm", functools.partial(orig, disable=True))
    # torch.fx emits a one-off "is_fx_tracing will return true ..." warning
    # through stdlib logging while llm-compressor traces the model.
    fx_log = logging.getLogger("torch.fx._symbolic_trace")
    old_level = fx_log.level
    fx_log.setLevel(logging.ERROR)
    try:
        with _loguru_silenced(True):
            yield
    finally:
        fx_log.setLevel(old_level)
        for mod, orig in patched:
            setattr(mod, "tqdm", orig)


def _tied_pairs(model) -> list[tuple[torch.nn.Module, str, torch.nn.Module, str]]:
    """(dst_module, dst_attr, src_module, src_attr) for weights that share one
    Parameter object (e.g. lm_head.weight is embed_tokens.weight)."""
    first: dict[int, tuple[torch.nn.Module, str]] = {}
    pairs = []
    for mod in model.modules():
        for pname, p in mod._parameters.items():
            if p is None:
                continue
            key = id(p)
            if key in first:
                src_mod, src_name = first[key]
                pairs.append((mod, pname, src_mod, src_name))
            else:
                first[key] = (mod, pname)
    return pairs


def _as_targets(targets_regex) -> list[str]:
    if targets_regex is None:
        return ["Linear"]
    if isinstance(targets_regex, str):
        targets_regex = [targets_regex]
    out = []
    for t in targets_regex:
        t = str(t)
        out.append(t if t.startswith("re:") else "re:" + t)
    return out


def run_llmcompressor(
    model,
    method: str,
    sparsity: float,
    pattern: str,
    calib_ids: torch.Tensor,
    targets_regex: str | Iterable[str] | None = None,
    *,
    quiet: bool = True,
    batch_size: int = 1,
) -> float:
    """Prune ``model`` in place with llm-compressor; return oneshot seconds.

    :param model: transformers causal LM (e.g. LlamaForCausalLM, fp32, CPU)
    :param method: "wanda" or "sparsegpt"
    :param sparsity: target fraction of zeros for unstructured; ignored by
        llm-compressor for "2:4" (always 50 %)
    :param pattern: "unstructured" (alias "0:0") or "2:4"
    :param calib_ids: int64 tensor [n_samples, seqlen]; every row is one
        calibration sample, used unchanged (all-ones attention mask)
    :param targets_regex: optional regex (or list) of module names to prune
        instead of all decoder Linear layers (lm_head is always ignored)
    :param quiet: silence llm-compressor's loguru output and tqdm bars
    :param batch_size: calibration batch size (llm-compressor default and
        recommendation: 1).  Wanda's and SparseGPT's statistics are running
        means over samples, so a larger batch gives the same result up to float
        rounding and is faster on CPU; the rows are all of length seqlen so the
        truncation collator removes nothing.
    :return: wall-clock seconds spent inside ``oneshot``
    """
    method = str(method).lower()
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if pattern not in _PATTERNS:
        raise ValueError(f"pattern must be 'unstructured' or '2:4', got {pattern!r}")
    mask_structure = _PATTERNS[pattern]
    sparsity = float(sparsity)
    if mask_structure == "0:0" and not 0.0 < sparsity < 1.0:
        raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")

    calib_ids = torch.as_tensor(calib_ids)
    if calib_ids.dim() != 2:
        raise ValueError(f"calib_ids must be [n_samples, seqlen], got {tuple(calib_ids.shape)}")
    calib_ids = calib_ids.to(device="cpu", dtype=torch.long)
    n_samples, seqlen = (int(s) for s in calib_ids.shape)
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    llmc = _import_llmc(quiet)
    SparseGPTModifier = llmc["SparseGPTModifier"]
    WandaPruningModifier = llmc["WandaPruningModifier"]

    common = dict(
        sparsity=sparsity,
        mask_structure=mask_structure,
        targets=_as_targets(targets_regex),
        # "re:" uses re.match (prefix); llm-compressor names the module
        # "lm_head." (trailing dot), so do not anchor with "$".
        ignore=["re:.*lm_head"],
    )
    if method == "wanda":
        modifier = WandaPruningModifier(**common)
    else:
        modifier = SparseGPTModifier(block_size=128, dampening_frac=0.01, **common)

    return _oneshot(model, modifier, calib_ids, llmc, quiet=quiet, batch_size=batch_size)


def run_reap(model, sparsity: float, calib_ids: torch.Tensor, *, quiet: bool = True) -> tuple[float, dict]:
    """Remove ``sparsity`` of every MoE layer's experts with llm-compressor's ``REAPPruningModifier`` (in place,
    sequential pipeline, batch size 1). Returns ``(oneshot seconds, {layer name: retained expert indices})``."""
    llmc = _import_llmc(quiet)
    if llmc["REAPPruningModifier"] is None:
        raise RuntimeError("this llmcompressor has no REAPPruningModifier (added in 0.14)")
    with tempfile.TemporaryDirectory(prefix="prunekit_reap_") as tmp:
        report = os.path.join(tmp, "retained.json")
        modifier = llmc["REAPPruningModifier"](sparsity=float(sparsity), report_path=report)
        seconds = _oneshot(model, modifier, torch.as_tensor(calib_ids).to(torch.long), llmc, quiet=quiet, batch_size=1)
        with open(report) as fh:
            retained = json.load(fh)
    return seconds, retained


def _oneshot(model, modifier, calib_ids: torch.Tensor, llmc: dict, *, quiet: bool, batch_size: int) -> float:
    """One ``oneshot`` call on exactly ``calib_ids``; the model is left a plain transformers model again."""
    Dataset, oneshot, reset_session = llmc["Dataset"], llmc["oneshot"], llmc["reset_session"]
    remove_dispatch = llmc["remove_dispatch"]
    n_samples, seqlen = (int(x) for x in calib_ids.shape)
    dataset = Dataset.from_dict(
        {
            "input_ids": calib_ids.tolist(),
            "attention_mask": torch.ones_like(calib_ids).tolist(),
        }
    )

    # --- state to restore afterwards ------------------------------------
    tied = _tied_pairs(model)
    had_save_attr = "save_pretrained" in model.__dict__
    old_save_attr = model.__dict__.get("save_pretrained")
    config = model.config
    old_name_or_path = getattr(config, "_name_or_path", "")

    with tempfile.TemporaryDirectory(prefix="prunekit_llmc_") as tmp:
        # config for Oneshot.validate_model (AutoConfig.from_pretrained(name_or_path))
        cfg_dict = json.loads(config.to_json_string(use_diff=False))
        cfg_dict.pop("quantization_config", None)
        with open(os.path.join(tmp, "config.json"), "w") as fh:
            json.dump(cfg_dict, fh)
        config._name_or_path = tmp
        try:
            with (
                _env(
                    LLM_COMPRESSOR_LOG_FILE=None,
                    LLM_COMPRESSOR_LOG_FILE_LEVEL=None,
                    TOKENIZERS_PARALLELISM=os.environ.get("TOKENIZERS_PARALLELISM", "false"),
                ),
                _quiet(quiet),
            ):
                t0 = time.perf_counter()
                oneshot(
                    model=model,
                    processor=_NoProcessor(),
                    recipe=modifier,
                    dataset=dataset,
                    num_calibration_samples=n_samples,
                    shuffle_calibration_samples=False,
                    max_seq_length=seqlen,
                    batch_size=int(batch_size),
                    data_collator="truncation",
                    pipeline="sequential",
                    output_dir=None,
                    log_dir=None,
                    clear_sparse_session=True,
                )
                seconds = time.perf_counter() - t0
        finally:
            config._name_or_path = old_name_or_path
            with contextlib.suppress(Exception), _loguru_silenced(quiet):
                reset_session()
            # undo compressed-tensors offloading wrappers left by the pipeline
            remove_dispatch(model, onload_tensors=False)
            for mod in model.modules():
                fwd = mod.__dict__.get("forward")
                if fwd is not None and getattr(fwd, "__func__", None) is type(mod).forward:
                    del mod.__dict__["forward"]
            for dst_mod, dst_name, src_mod, src_name in tied:
                src = src_mod._parameters[src_name]
                if dst_mod._parameters.get(dst_name) is not src:
                    dst_mod._parameters[dst_name] = src
            if had_save_attr:
                model.__dict__["save_pretrained"] = old_save_attr
            else:
                model.__dict__.pop("save_pretrained", None)

    return seconds
