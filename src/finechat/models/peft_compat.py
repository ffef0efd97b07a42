"""Make peft's prefix tuning (P-Tuning v2) generate correctly with transformers 5.

peft 0.21 injects the trained prefix into ``generate`` through the ``past_key_values`` keyword, but
transformers 5.24's ``prepare_inputs_for_generation`` names the cache ``cache``; the model then prefers the
empty ``cache`` and silently ignores the prefix, so a P-Tuning v2 checkpoint chats exactly like its base
model. Renaming the key back before peft looks at it restores the intended behaviour: greedy generation
then matches the adapter's forward logits to 1e-7 (checked in tests/test_train_methods.py).

peft 0.22 asks transformers for the cache's name itself (``peft.import_utils.get_transformers_cache_name``) and
injects the prefix under ``cache``; renaming the key there would hide the cache from peft, which then injects the
prefix a second time beside it and the model keeps the empty one. So the patch is applied only to a peft that
does not name the cache itself.
"""

from __future__ import annotations

from typing import Any


def _peft_names_the_cache() -> bool:
    """True when the installed peft picks transformers' cache keyword itself (peft 0.22 and later)."""
    try:
        from peft.import_utils import get_transformers_cache_name
    except ImportError:
        return False
    return get_transformers_cache_name() == "cache"


def fix_prefix_generation(model: Any) -> Any:
    """Patch one PeftModel *instance* (not the class) whose adapter is prompt learning; returns it.

    Does nothing where peft already passes the prefix under transformers' own cache name.
    """
    if _peft_names_the_cache():
        return model
    config = getattr(model, "active_peft_config", None)
    base_prepare = getattr(model, "base_model_prepare_inputs_for_generation", None)
    if config is None or not getattr(config, "is_prompt_learning", False) or base_prepare is None:
        return model
    if getattr(base_prepare, "_finechat_renames_cache", False):
        return model

    def prepare(*args: Any, **kwargs: Any) -> dict:
        out = base_prepare(*args, **kwargs)
        if "cache" in out and "past_key_values" not in out:
            out["past_key_values"] = out.pop("cache")
        return out

    prepare._finechat_renames_cache = True  # type: ignore[attr-defined]
    model.base_model_prepare_inputs_for_generation = prepare
    return model
