"""What the page says about the loaded models and the session's runs: the models' summary, a
run's summary and the session's leaderboard (shown by several sections)."""
from __future__ import annotations

from .. import figures
from ..workspace import params_text, short, size_text
from .common import AppState, fmt, sig

LEADERBOARD_HEADERS = ["run", "method", "models", "settings", "objective", "EM per domain", "lm-eval"]
LEADERBOARD_WIDTHS = ["5%", "9%", "15%", "19%", "12%", "18%", "22%"]


def summary_markdown(ws) -> str:
    s = ws.access.summary()
    norms = ws.stats.norms()
    lines = [f"**{s['parameters']:,} parameters** in {s['tensors']} tensors ({s['blocks']} blocks), "
             f"dtype **{s['dtype']}**; base `{short(s['base'])}`.", "",
             "| fine-tune | ‖δ‖ / ‖base‖ |", "|---|---|"]
    for i, ref in enumerate(s["fine_tunes"]):
        lines.append(f"| `{short(ref)}` | {fmt(norms[i])} |" if norms else f"| `{short(ref)}` | (computing…) |")
    return "\n".join(lines)


def run_summary(run) -> str:
    if run.is_smile:
        lines = [f"**{run.label()}** built in **{fmt(run.seconds)} s** on **{run.device}**.  ",
                 f"Size: {size_text(run.parameters)}.  ",
                 "The SMILE model is now the merged model: chat with it (5 · Chat shows which expert wrote each "
                 "token) or score it (6 · Score adds routing accuracy per domain)."]
    else:
        kept = ", ".join(f"`{short(m)}` {fmt(100 * k)}%" for m, k in zip(run.models, run.kept_fraction))
        lines = [f"**{run.label()}** merged in **{fmt(run.seconds)} s** on **{run.device}**.  ",
                 f"Kept of each delta: {kept}.  ",
                 "The merged model is ready: chat with it (5 · Chat) or score it (6 · Score)."]
    lines += [f"\n⚠ {n}" for n in run.notices]
    return "\n".join(lines)


def leaderboard(state: AppState) -> list[list]:
    rows = []
    ws = state.ws
    for r in (ws.runs.items if ws is not None else []):
        em = (" · ".join(f"{d} {s['em']:.2f}" for d, s in r.scores.items() if s.get("em") is not None)
              if r.scores else "not scored")
        settings = params_text(r.config) + (f"; {size_text(r.parameters)}" if r.is_smile else "")
        rows.append([r.number, r.config.method_name, ", ".join(short(m) for m in r.models), settings,
                     sig(r.objective), em, lm_eval_text(r.lm_eval)])
    return rows


def lm_eval_text(results: dict) -> str:
    """A run's lm-eval scores for its leaderboard row, per (limit, few-shot): "50 docs, 0-shot:
    zoo_cipher_mc acc 0.96 · zoo_sort_mc acc 1"."""
    if not results:
        return "not scored"
    by_setting: dict = {}
    for (task, limit, shots), res in results.items():
        by_setting.setdefault((limit, shots), []).append(f"{task} {res['metric']} {fmt(res['metrics'][res['metric']])}")
    return "; ".join(f"{'all' if limit is None else limit} docs, {shots or 0}-shot: " + " · ".join(parts)
                     for (limit, shots), parts in by_setting.items())


def model_rows(run, fine_tunes: list[str], results: dict[str, dict], objective: float | None = None) -> list[dict]:
    """The bars of a score chart: the merged model (`run`), the base and each fine-tune in its
    colour, from results {"merged" | "base" | ref: {domain or task: {...}}}."""
    rows = [{"label": f"merged ({run.name})", "color": figures.MERGED_COLOR, "merged": True,
             "scores": results["merged"], "objective": objective},
            {"label": "base", "color": figures.BASE_COLOR, "scores": results["base"]}]
    return rows + [{"label": short(r), "color": figures.color(i), "scores": results[r]} for i, r in enumerate(fine_tunes)]
