"""Reading a merge YAML: its documents, and each value in the YAML's own spellings (numbers, booleans,
choices, model refs, layer ranges, named chat templates, token entries), refused by key with the fix.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from .. import params as P
from ..registry import Param
from .model import ConfigError, MergeConfig

# The YAML's spellings of an output dtype -> its name in io.DTYPES.
DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "float": "float32",
          "float16": "float16", "fp16": "float16", "half": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


# mergekit's named templates, written out here in our own Jinja: each renders, through transformers'
# apply_chat_template, exactly what mergekit 0.1.5's template of that name renders (its quirks
# included: llama3 trims every message; alpaca puts the last system message first, trims, and
# leaves no blank line before the generation prompt; mistral folds a first system message into
# the first user turn; exaone keeps the indentation of mergekit's file). Every piece of text is a
# string literal, so the output does not depend on the renderer's whitespace settings.
NAMED_CHAT_TEMPLATES = {
    "chatml": "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    "llama3": "{% if messages %}{{ bos_token }}{% endif %}{% for m in messages %}"
              "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>\\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
              "{% endif %}",
    "alpaca": "{% set system = messages | selectattr('role', 'equalto', 'system') | list %}"
              "{{ (system | last)['content'] | trim if system else '' }}{{ '\\n\\n' }}"
              "{% set heads = {'user': '### Instruction:\\n', 'assistant': '### Response:\\n', "
              "'user_context': '### Input:\\n'} %}"
              "{% for m in messages %}{% if m['role'] in heads %}{{ heads[m['role']] + m['content'] | trim }}"
              "{% if not loop.last %}{{ '\\n\\n' }}{% endif %}{% endif %}{% endfor %}"
              "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '### Response:\\n' }}{% endif %}",
    "mistral": "{% set has_system = messages and messages[0]['role'] == 'system' %}"
               "{% set turns = messages[1:] if has_system else messages %}{{ bos_token }}{% for m in turns %}"
               "{% if (m['role'] == 'user') != (loop.index0 is even) %}"
               "{{ raise_exception('mistral chat template: after an optional first system message the turns must "
               "alternate user, assistant, user, ...') }}{% endif %}"
               "{% if m['role'] == 'user' %}{{ ' [INST] ' }}"
               "{% if loop.first and has_system %}{{ messages[0]['content'] + '\\n\\n' }}{% endif %}"
               "{{ m['content'] + ' [/INST]' }}"
               "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}"
               "{% else %}{{ raise_exception('mistral chat template: only user and assistant turns after an optional "
               "first system message') }}{% endif %}{% endfor %}",
    "exaone": "{% for m in messages %}"
              "{% if loop.first and m['role'] != 'system' %}{{ '        [|system|][|endofturn|]\\n\\n' }}{% endif %}"
              "{{ '    [|' + m['role'] + '|]' + m['content'] + '\\n' }}"
              "{{ '        \\n\\n' if m['role'] == 'user' else '        [|endofturn|]\\n\\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '    [|assistant|]\\n' }}{% endif %}",
}


TOKEN_KEYS = ("source", "force")


def number(value, key: str, *, lo=None, hi=None, lo_open=False, integer=False) -> float:
    """One number for the whole merge (no gradient), read and bounds-checked as params reads one."""
    if isinstance(value, (list, dict)):
        raise ConfigError(f"`{key}` is one value for the whole merge; it cannot be a gradient list or "
                          f"filter entries ({value!r})")
    try:
        return P.check_scalar(value, Param(key, "int" if integer else "float", None, "", lo=lo, hi=hi,
                                           lo_open=lo_open), key)
    except P.SettingError as e:
        raise ConfigError(str(e)) from None


def boolean(value, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"`{key}` must be true or false, got {value!r}")
    return value


def choice(value, key: str, options) -> str:
    if value not in options:
        raise ConfigError(f"`{key}` = {value!r} is not one of {', '.join(options)}")
    return value


def rescale_mode(value, key: str) -> str:
    # mergekit's `rescale: true` rescales to the L1 norm; false = none; "paper" = DARE's 1/density
    # (DELLA's 1/p per entry).
    if value is True:
        return "l1"
    if value is False:
        return "none"
    if isinstance(value, (list, dict)):
        raise ConfigError(f"`{key}` is one value per model; it cannot be a gradient or filters")
    return choice(value, key, ("l1", "none", "paper"))


def floats(value, key: str) -> list[float]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"`{key}` must be a non-empty list of numbers, got {value!r}")
    return [number(v, f"{key}[{i}]") for i, v in enumerate(value)]


def model_ref(value, key: str, notices: list[str] | None = None) -> str:
    """A model reference: path, hub id[@rev], demo:NAME, MODEL+LORA, or mergekit's mapping
    {model, lora, override_architecture}. Returned as one string (MODEL or MODEL+LORA)."""
    if isinstance(value, dict):
        extra = set(value) - {"model", "lora", "override_architecture"}
        if extra or "model" not in value:
            raise ConfigError(f"`{key}`: a model mapping has `model` and optionally `lora` (and "
                              f"`override_architecture`), got keys {', '.join(sorted(value))}")
        if value.get("override_architecture") and notices is not None:
            notices.append(f"`{key}.override_architecture` only picks mergekit's architecture table; "
                           f"ignored here (tensors are matched by name)")
        model = value["model"]
        if isinstance(model, dict):     # mergekit's dumped form {path, revision}
            model = model.get("path", "") + (f"@{model['revision']}" if model.get("revision") else "")
        lora = value.get("lora")
        if isinstance(lora, dict):
            lora = lora.get("path", "") + (f"@{lora['revision']}" if lora.get("revision") else "")
        value = f"{model}+{lora}" if lora else model
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"`{key}` must be a model path, hub id or demo:NAME, got {value!r}")
    value = value.strip()
    if value.count("+") > 1 or value.startswith("+") or value.endswith("+"):
        raise ConfigError(f"`{key}` = {value!r}: write a LoRA reference as MODEL+ADAPTER (one `+`)")
    return value


def layer_range(value, where: str) -> tuple[int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"`{where}` must be [start, end] (two layer numbers, end excluded), got {value!r}")
    a, b = value
    if a < 0 or b <= a:
        raise ConfigError(f"`{where}` = [{a}, {b}] is empty or reversed: give 0 <= start < end (end excluded)")
    return a, b


def apl_data_path(value, key: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"`{key}` must be the path of a JSONL file of {{\"prompt\", \"answer\"}} lines, got {value!r}")
    return value.strip()


def token_entry(v, where: str, notices) -> dict:
    if not isinstance(v, dict):
        raise ConfigError(f"`{where}` must be a mapping with `source` (a model, {{kind: model_token, model, "
                          f"token | token_id}} or {{kind: zero}}) and optionally `force`")
    extra = set(v) - set(TOKEN_KEYS)
    if extra:
        raise ConfigError(f"unknown key(s) {', '.join(sorted(extra))} in `{where}`; known: source, force")
    out: dict[str, Any] = {"force": boolean(v.get("force", False), f"{where}.force")}
    s = v.get("source")
    if s is None:
        out["source"] = None
    elif isinstance(s, dict) and "kind" in s:
        if s["kind"] == "zero":
            if set(s) != {"kind"}:
                raise ConfigError(f"`{where}.source` of kind zero takes no other keys")
            out["source"] = {"kind": "zero"}
        elif s["kind"] == "model_token":
            extra = set(s) - {"kind", "model", "token", "token_id"}
            if extra or "model" not in s:
                raise ConfigError(f"`{where}.source` of kind model_token needs `model` and one of `token` / "
                                  f"`token_id`")
            if ("token" in s) == ("token_id" in s):
                raise ConfigError(f"`{where}.source`: give exactly one of `token` and `token_id`")
            d = {"kind": "model_token", "model": model_ref(s["model"], f"{where}.source.model", notices)}
            if "token_id" in s:
                d["token_id"] = number(s["token_id"], f"{where}.source.token_id", lo=0, integer=True)
            else:
                if not isinstance(s["token"], str):
                    raise ConfigError(f"`{where}.source.token` must be text")
                d["token"] = s["token"]
            out["source"] = d
        else:
            raise ConfigError(f"`{where}.source.kind` = {s['kind']!r} is not one of model_token, zero")
    else:
        out["source"] = model_ref(s, f"{where}.source", notices)
    return out


def single_document(source) -> dict:
    docs = read_documents(source)
    if len(docs) != 1:
        raise ConfigError(f"this config has {len(docs)} YAML documents (a multi-stage merge, as "
                          f"mergekit-multimerge runs): load it with load_stages, or run it with "
                          f"`python -m dppa_ui merge FILE --out DIR`")
    return docs[0]


def read_documents(source) -> list[dict]:
    if isinstance(source, MergeConfig):
        return [source.to_dict()]
    if isinstance(source, dict):
        return [copy.deepcopy(source)]
    if isinstance(source, (list, tuple)) and all(isinstance(d, dict) for d in source):
        return copy.deepcopy(list(source))
    if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source and source.endswith((".yaml", ".yml"))):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        text = path.read_text()
    elif isinstance(source, str):
        text = source
    else:
        raise ConfigError(f"a config must be a dict, YAML text or a .yaml path, got {type(source).__name__}")
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"the config is not valid YAML{where}: {problem}") from None
    if not docs or not all(isinstance(d, dict) for d in docs):
        raise ConfigError("the config must be a YAML mapping with at least `merge_method`, `base_model` and `models`")
    return docs
