"""Loading weights by Hugging Face checkpoint name into the live model, in place.

Names are the Hub checkpoint names (what `save_pretrained` writes and what trainers export):
- names of live parameters are copied directly (`model.layers.0.self_attn.q_proj.weight`);
- per-expert MoE names (`model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight`) land in the
  slices of transformers 5's fused expert tensors (`experts.gate_up_proj` [E, 2I, H] holds gate
  rows then up rows; `experts.down_proj` [E, H, I]);
- `lm_head.weight` of a tied model is the embedding itself, so it is accepted and written there.

Every update is validated (name and shape) before anything is written: a bad update is refused
whole and the model keeps its old weights. Copies are `param.copy_()` under no_grad, so storage
(and data_ptr) never changes and dtypes are converted on the way (bf16 in, fp32 model is fine).
"""

import logging
import re
from collections.abc import Iterable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_EXPERT_RE = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


class WeightLoadError(ValueError):
    """An update names an unknown tensor or has the wrong shape; nothing was written."""


class WeightLoader:
    """Resolves HF names to (parameter, slice) targets of one live model."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.params = dict(model.named_parameters(remove_duplicate=False))
        # GLM/DeepSeek-style routers keep their expert bias in a buffer; the trainer syncs it too.
        self.params.update((n, b) for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
        self.tied = bool(getattr(model.config, "tie_word_embeddings", False))

    def target(self, name: str) -> torch.Tensor:
        """The live tensor (a view, for expert slices) that `name` writes to; KeyError if none."""
        if name in self.params:
            return self.params[name].data
        if name == "lm_head.weight" and self.tied:
            return self.model.get_output_embeddings().weight.data
        m = _EXPERT_RE.match(name)
        if m:
            e, proj = int(m["e"]), m["proj"]
            if proj == "down_proj":
                fused = self.params.get(f"{m['prefix']}.down_proj")
                if fused is not None and e < fused.shape[0]:
                    return fused.data[e]
            else:
                fused = self.params.get(f"{m['prefix']}.gate_up_proj")
                if fused is not None and e < fused.shape[0]:
                    inter = fused.shape[1] // 2
                    return fused.data[e, :inter] if proj == "gate_proj" else fused.data[e, inter:]
        raise KeyError(name)

    def check(self, names_shapes: Iterable[tuple[str, tuple[int, ...]]]) -> None:
        """Raise WeightLoadError listing every unknown name and wrong shape."""
        problems = []
        for name, shape in names_shapes:
            try:
                have = tuple(self.target(name).shape)
            except KeyError:
                problems.append(f"unknown weight name {name!r}")
                continue
            if have != tuple(shape):
                problems.append(f"{name}: shape {list(shape)} does not match the model's {list(have)}")
        if problems:
            raise WeightLoadError("; ".join(problems[:20]) + (f" (+{len(problems) - 20} more)" if len(problems) > 20 else ""))

    @torch.no_grad()
    def load(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        """Validate all, then copy all in place; return the number of elements written."""
        self.check((n, tuple(t.shape)) for n, t in named_tensors)
        written = 0
        for name, tensor in named_tensors:
            dst = self.target(name)
            dst.copy_(tensor.to(device=dst.device))
            written += tensor.numel()
        return written

    def get(self, name: str, truncate_size: int = 100) -> list:
        """SGLang's /get_weights_by_name: the first truncate_size rows (or elements) as float32 lists."""
        try:
            t = self.target(name)
        except KeyError:
            raise WeightLoadError(f"unknown weight name {name!r}") from None
        return t[:truncate_size].float().cpu().tolist()


def read_safetensors_dir(path: str | Path) -> list[tuple[str, torch.Tensor]]:
    """All tensors of every *.safetensors file in a folder (HF layout, sharded or not)."""
    from safetensors.torch import load_file

    folder = Path(path)
    if not folder.is_dir():
        raise WeightLoadError(f"model_path {str(folder)!r} is not a directory")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightLoadError(f"no *.safetensors files in {str(folder)!r}")
    tensors: list[tuple[str, torch.Tensor]] = []
    for f in files:
        tensors.extend(load_file(str(f)).items())
    logger.info("read %d tensors from %d file(s) in %s", len(tensors), len(files), folder)
    return tensors
