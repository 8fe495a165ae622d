"""The PEFT tuner (``BaseTuner``) shared by all peft_ctx methods (``peft_type`` ``PEFT_CTX``).

It installs the ``ContextEmbedding`` layer (``layer.py``) on the model's input embedding, lets each method add its own
PEFT layers (COCOM's LoRA), and, for every forward / generate call, hands the method's context inputs to that layer.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
from accelerate import init_empty_weights
from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
    _filter_state_dict_by_key_prefixes,
    _get_tuner_state_dict_key_prefixes,
)
from torch import nn

from ._registration import PREFIX
from .distributed import full_shape
from .layer import COMPANION_SEP, ContextEmbedding, companion_name
from .methods import MERGE_MESSAGE, ContextMethod, all_input_names, get_method


class ContextModel(BaseTuner):
    """PEFT tuner for every peft_ctx method (``peft_type`` ``PEFT_CTX``)."""

    prefix: str = PREFIX
    # Every tuner layer in the model is ours: the context embedding and the layers methods inject (LoRA for COCOM),
    # so PEFT's set_adapter / delete_adapter reach all of them.
    tuner_layer_cls = BaseTunerLayer
    target_module_mapping: dict = {}

    # ---- injection ---------------------------------------------------------------------------------------------
    def _prepare_adapter_config(self, peft_config, model_config):
        return peft_config

    def _create_and_replace(self, *args, **kwargs):  # required by BaseTuner; injection is done in inject_adapter
        raise NotImplementedError

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        config = self.peft_config[adapter_name]
        method = get_method(config.method)
        if not hasattr(model, "get_input_embeddings") or not hasattr(model, "set_input_embeddings"):
            raise ValueError(
                f"{type(model).__name__} has no get_input_embeddings/set_input_embeddings; peft_ctx adapts Hugging "
                "Face causal LMs (AutoModelForCausalLM)."
            )
        embedding = model.get_input_embeddings()
        hidden_size = int(full_shape(embedding.weight)[-1])  # whole sizes, also on ZeRO-3 partitioned weights
        vocab_size = int(full_shape(embedding.weight)[0])
        if config.base_vocab_size is None:
            config.base_vocab_size = vocab_size
        elif config.base_vocab_size != vocab_size:
            raise ValueError(
                f"This adapter was made for a base model with a {config.base_vocab_size}-token vocabulary "
                f"({config.base_model_name_or_path!r}), but {type(model).__name__} has {vocab_size} embedding rows; "
                "its prompts would be tokenised for another model. Load it onto the base model it was trained on."
            )
        if config.base_hidden_size is None:
            config.base_hidden_size = hidden_size
        elif config.base_hidden_size != hidden_size:
            raise ValueError(
                f"This adapter was made for a base model with hidden size {config.base_hidden_size} "
                f"({config.base_model_name_or_path!r}), but {type(model).__name__} has hidden size {hidden_size}; "
                "load it onto the base model it was trained on."
            )
        method.check_base_model(config, model)
        previous_grad = {id(p): p.requires_grad for p in model.parameters()}
        first_injection = not isinstance(embedding, ContextEmbedding)
        if first_injection:
            layer = ContextEmbedding(embedding, adapter_name)
        else:
            layer = embedding
        model_config = getattr(model, "config", None)
        if low_cpu_mem_usage:
            with init_empty_weights():
                layer.update_layer(adapter_name, config, model_config)
        else:
            layer.update_layer(adapter_name, config, model_config)
        if first_injection:
            model.set_input_embeddings(layer)
            if model.get_input_embeddings() is not layer:
                raise ValueError(f"{type(model).__name__}.set_input_embeddings did not install the peft_ctx layer.")
        method.inject(self, model, adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage)
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                # New modules (dropout in LoRA, an encoder) start in training mode; they follow the model's mode.
                module.train(model.training)
                if module is not layer:
                    # Injected PEFT layers come up with the new adapter active; the active adapters stay as they were.
                    module.set_adapter(self.active_adapters)
        self.targeted_module_names = [n for n, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
        self._mark_only_adapters_as_trainable(model)
        if not first_injection:
            # Adding an adapter must not change what was trainable before (PEFT's own rule).
            for param in model.parameters():
                if id(param) in previous_grad:
                    param.requires_grad_(previous_grad[id(param)])
        self._sync_companion_grads()
        if config.inference_mode:
            for param in self._adapter_parameters(adapter_name):
                param.requires_grad_(False)
        # Every weight set of the adapter, companions included: AdamW on bf16 weights drops small updates.
        for name in (adapter_name, *self._companions(adapter_name)):
            self._cast_adapter_dtype(adapter_name=name, autocast_adapter_dtype=autocast_adapter_dtype)

    # ---- companions: extra weight sets of one adapter (a separate compressor LoRA) --------------------------------
    def _companions(self, adapter_name: str) -> list[str]:
        config = self.peft_config.get(adapter_name)
        if config is None:
            return []
        return [companion_name(adapter_name, role) for role in get_method(config.method).companion_roles(config)]

    def _adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """All parameters of one adapter: its entries in every tuner layer, companions included."""
        names = [adapter_name, *self._companions(adapter_name)]
        params = []
        for module in self.model.modules():
            if isinstance(module, BaseTunerLayer):
                for attr in module.adapter_layer_names:
                    entries = getattr(module, attr)
                    params.extend(p for name in names if name in entries for p in entries[name].parameters())
        return params

    def _sync_companion_grads(self) -> None:
        # PEFT switches requires_grad by adapter name; a companion follows its adapter's entry in the same layer.
        for adapter_name in self.peft_config:
            for companion in self._companions(adapter_name):
                for module in self.model.modules():
                    if not isinstance(module, BaseTunerLayer):
                        continue
                    for attr in module.adapter_layer_names:
                        entries = getattr(module, attr)
                        if companion in entries and adapter_name in entries:
                            trainable = any(p.requires_grad for p in entries[adapter_name].parameters())
                            entries[companion].requires_grad_(trainable)

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        self._sync_companion_grads()

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        if enabled:
            self._sync_companion_grads()

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        self._sync_companion_grads()

    def delete_adapter(self, adapter_name: str) -> None:
        companions = self._companions(adapter_name)
        if adapter_name in self.merged_lora_adapters():
            self.unmerge_adapter()  # PEFT's LoRA layers would drop the weights but leave their delta in the base
        super().delete_adapter(adapter_name)
        for module in self.model.modules():
            if isinstance(module, BaseTunerLayer):
                for companion in companions:
                    if companion in module._all_available_adapter_names():
                        module.delete_adapter(companion)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        # PEFT dropped the other adapters' own entries; their companions ("<other>__<role>") are dropped here.
        others = tuple(f".{name}{COMPANION_SEP}" for name in unwanted_adapter_names)
        return {key: value for key, value in to_return.items() if not any(o in key for o in others)}

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        roles = get_method(config.method).companion_roles(config)
        if roles:
            model_state = model.state_dict()
            checkpoint_to_model = {}
            for role in roles:
                prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=companion_name(adapter_name, role))
                for model_key in _filter_state_dict_by_key_prefixes(model_state, prefixes):
                    checkpoint_key = cls._remove_adapter_name_from_key(model_key, adapter_name)
                    checkpoint_to_model[checkpoint_key] = model_key
                    checkpoint_to_model[checkpoint_key.removeprefix("base_model.model.")] = model_key
            state_dict = {checkpoint_to_model.get(key, key): value for key, value in state_dict.items()}
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # Adapter modules are nested (ctx_modules.<name>.projector.0.weight), deeper than PEFT's default assumes.
        if f".ctx_modules.{adapter_name}." in key:
            return key.replace(f".ctx_modules.{adapter_name}.", ".ctx_modules.", 1)
        companion = f".{adapter_name}{COMPANION_SEP}"
        if companion in key:  # q_proj.lora_A.<name>__compressor.weight -> q_proj.lora_A.compressor.weight
            return key.replace(companion, ".", 1)
        # Layers that methods inject (LoRA: q_proj.lora_A.<name>.weight) follow PEFT's own key format.
        return super()._remove_adapter_name_from_key(key, adapter_name)

    def context_layer(self) -> ContextEmbedding:
        """The ``ContextEmbedding`` layer on the input embedding (its ``base_layer`` is the original embedding)."""
        layer = self.model.get_input_embeddings()
        if not isinstance(layer, ContextEmbedding):
            raise ValueError("The peft_ctx layer is missing from the model's input embedding (was it unloaded?).")
        return layer

    # ---- merging: only the weight deltas a method adds to the LLM (COCOM's decoder LoRA), through its hooks -------
    def _check_merge_allowed(self):
        # merge_and_unload would drop the context layer along with the LoRA layers: the slots would read token text.
        raise ValueError(MERGE_MESSAGE)

    def _methods(self) -> list[ContextMethod]:
        """The methods of this model's adapters, each once."""
        return list({config.method: get_method(config.method) for config in self.peft_config.values()}.values())

    def merged_lora_adapters(self) -> list[str]:
        """Adapters whose LoRA weights are merged into the base weights now (by ``merge_adapter``)."""
        return sorted({name for method in self._methods() for name in method.merged_adapters(self.model)})

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """Fold the active adapter's weight delta (COCOM's decoder LoRA) into the base weights: decoding then runs at
        the base model's speed, with the context slots still filled at run time. Undo with ``unmerge_adapter()``.
        Adapters that only fill context slots (xRAG, SPRING) have no delta and refuse.

        A separate compressor LoRA stays unmerged, so compressing passages needs ``unmerge_adapter()`` first (or an
        index compressed beforehand); training needs it too, since merged LoRA weights get no gradient.

        Example::

            model.merge_adapter()
            answers = peft_ctx.generate(model, tokenizer, questions, index.select(ids))  # a CompressedIndex
            model.unmerge_adapter()
        """
        active = self.context_layer().active_method_adapter()
        if adapter_names is None:
            adapter_names = [active]
        for name in adapter_names:
            if name not in self.peft_config:
                raise ValueError(f"No adapter named {name!r}; this model has {sorted(self.peft_config)}.")
            if name != active:
                # Its delta would sit under the active adapter's context slots and LoRA: a model of neither.
                raise ValueError(
                    f"Adapter {name!r} is not the active one ({active!r}); merge only the active adapter, or "
                    f"model.set_adapter({name!r}) first."
                )
            get_method(self.peft_config[name].method).merge(self.model, name, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        """Take every merged delta back out of the base weights (the inverse of ``merge_adapter``)."""
        for method in self._methods():
            method.unmerge(self.model)

    def _unload_and_optionally_merge(self, merge: bool = True, **kwargs):
        if not merge:
            # PEFT's unload keeps merged deltas in the base weights; unload() promises the base model unchanged.
            self.unmerge_adapter()
        return super()._unload_and_optionally_merge(merge=merge, **kwargs)

    def _check_not_merged_for_training(self) -> None:
        merged = self.model.training and self.merged_lora_adapters()  # the module walk only when training
        if merged:
            raise ValueError(
                f"The LoRA weights of {merged} are merged into the base weights (merge_adapter()), where they get no "
                "gradient; call model.unmerge_adapter() before training."
            )

    # ---- forward / generate ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _context(self, kwargs: dict[str, Any]):
        names = all_input_names()
        inputs = {name: kwargs.pop(name) for name in list(kwargs) if name in names}
        context_mask = inputs.pop("context_mask", None)
        has_slots = context_mask is not None and bool(context_mask.any())
        if not has_slots:
            given = sorted(name for name, value in inputs.items() if value is not None)
            if given:
                raise ValueError(
                    f"{', '.join(given)} given but the prompt has no context slots (context_mask is "
                    f"{'missing' if context_mask is None else 'all False'}); build inputs with "
                    "peft_ctx.prepare_inputs."
                )
            yield
            return
        if context_mask.dtype != torch.bool:
            raise ValueError(f"context_mask must be a bool tensor, got dtype {context_mask.dtype}.")
        layer = self.context_layer()
        if not layer.disable_adapters:
            adapter_name = layer.active_method_adapter()
            config = self.peft_config[adapter_name]
            method = get_method(config.method)
            method.check_inputs(config, context_mask, inputs)
            # Before the slots are pending, so that a method running the model itself (COCOM) fills no slots there.
            inputs = method.before_forward(self, adapter_name, config, context_mask, inputs)
        layer._pending, layer._consumed = (context_mask, inputs), False
        try:
            yield
            if not layer._consumed and not layer.disable_adapters:
                raise ValueError(
                    "The context slots were never filled: the model did not call its input embedding. Pass input_ids "
                    "(not inputs_embeds) together with context_mask."
                )
        finally:
            layer._pending = None

    def forward(self, *args: Any, **kwargs: Any):
        self._check_not_merged_for_training()
        with self._context(kwargs):
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any):
        with self._context(kwargs):
            return self.model.generate(*args, **kwargs)
