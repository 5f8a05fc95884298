"""``GPT2ModelPipe``: the GPT-NeoX model as a DeepSpeed ``PipelineModule`` (docs/internals.md, "Model")."""
import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

from megatron.model.layer_list import activation_checkpoint_interval, compile_layers, gpt2_layer_specs
from megatron.model.loss import lm_loss
from megatron.model.utils import CHECKPOINTABLE_LAYERS, Lambda, SequentialWrapper, non_reentrant_checkpoint


def cross_entropy(output: torch.Tensor, labels) -> torch.Tensor:
    """The pipeline engine's ``loss_fn`` form of :func:`megatron.model.loss.lm_loss`:
    ``labels = (label_ids [B,S], loss_mask [B,S])``."""
    return lm_loss(output, labels[0], labels[1])


def _to_deepspeed_spec(spec):
    if spec.function is not None:
        return spec.function
    if spec.tie_key is not None:
        return TiedLayerSpec(spec.tie_key, spec.typename, *spec.args, forward_fn=spec.forward_fn,
                             tied_weight_attr=["word_embeddings.weight"], **spec.kwargs)
    return LayerSpec(spec.typename, *spec.args, **spec.kwargs)


class GPT2ModelPipe(PipelineModule):
    """GPT-NeoX for pipeline (and, through :meth:`to_sequential`, plain) execution.

    Input ``(input_ids [B,S], position_ids [B,S][, attention_mask])``; output logits ``[B,S,V]``. Layer
    indices and parameter names are GPT-NeoX's, so its checkpoints' ``layer_XX-model_00-model_states.pt``
    files map one to one.
    """

    def __init__(self, neox_args, topology=None, parallel_output: bool = False):
        self.neox_args = neox_args
        self.parallel_output = parallel_output
        self.specs = gpt2_layer_specs(neox_args, parallel_output)
        kwargs = {"topology": topology} if topology is not None else {
            "num_stages": neox_args.pipe_stages}
        super().__init__(
            layers=[_to_deepspeed_spec(s) for s in self.specs],
            loss_fn=cross_entropy,
            partition_method=neox_args.pipe_partition_method,
            activation_checkpoint_interval=activation_checkpoint_interval(neox_args),
            activation_checkpoint_func=non_reentrant_checkpoint,
            checkpointable_layers=list(CHECKPOINTABLE_LAYERS),
            **kwargs,
        )
        if neox_args.torch_compile:
            compile_layers(self.forward_funcs)
        # DeepSpeed's engine fills the per-block "checkpointable" table when it wraps the module; do it here too
        # so a bare GPT2ModelPipe (tests, tools) checkpoints the same blocks instead of skipping every layer.
        if hasattr(self, "_precompute_checkpointable_values"):
            self._precompute_checkpointable_values()

    def to_sequential(self) -> SequentialWrapper:
        """The same modules (same parameters) as a plain ``nn.Module`` for ``pipe_parallel_size == 0``.

        Only a single-stage pipeline holds every layer, so only it can be made sequential.
        """
        if self.num_stages != 1:
            raise ValueError(f"to_sequential needs a single-stage pipeline; this one has {self.num_stages} stages "
                             "(pipe_parallel_size must be 0 or 1)")
        layers = []
        for func in self.forward_funcs:
            layers.append(func if isinstance(func, torch.nn.Module) else Lambda(func))
        return SequentialWrapper(layers, self.activation_checkpoint_interval, non_reentrant_checkpoint)
