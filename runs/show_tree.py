"""
runs/show_tree.py — procedure cloning, seen: one MCTS tree and the ASTRO and Direct traces from it.

    python runs/show_tree.py                          # the first tree with right and wrong endings
    python runs/show_tree.py --trees=out/search/trees.jsonl --id=cd4-train-00017
    python runs/show_tree.py --paths_only=False       # every node, not only the traces' paths

Prints the tree (each node: id, prior, N, Q, the step's text, and at a terminal the grader's
verdict), then every trace linearize.py writes from it with the same settings: the ASTRO traces
(wrong terminals first, each followed by a reflection and a backtrack to the deepest step it shares
with the next path) and the Direct traces (a plain path to a correct terminal). Each trace line is
tagged with the node it copies, so a reader can follow the trace through the tree.
"""
import os
import sys
from collections import Counter
from dataclasses import dataclass

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import common  # noqa: E402
import linearize  # noqa: E402
import tasks  # noqa: E402


@dataclass
class Config:
    trees: str = "out/search/trees.jsonl"  # search.py's output
    id: str = ""                 # tree id; "" = the first tree with a correct and a wrong terminal
    linearize: str = ""          # a linearize config file ("" = its defaults, as the main job)
    paths_only: bool = True      # only nodes on a trace's path (trees have hundreds of nodes)
    width: int = 60              # characters of step text shown per node


def pick_tree(trees, tree_id):
    if tree_id:
        for tree in trees:
            if tree["id"] == tree_id:
                return tree
        raise common.UserError(f"no tree with id {tree_id!r}")
    for tree in trees:
        good, bad = linearize.terminals(tree["nodes"])
        if good and bad:
            return tree
    raise common.UserError("no tree has both a correct and a wrong terminal; pass --id")


def used_terminals(tree, traces):
    """The terminal ids each trace visits, recovered by following its text through the tree."""
    nodes, rec = tree["nodes"], tree["problem"]
    ends = [n["id"] for n in nodes if n["terminal"]]
    delim = tasks.step_delimiter(rec)
    visits = []
    for text, *_ in traces:
        visits.append([t for t in ends if linearize.step_text(nodes[t], delim, rec) in text
                       and all(linearize.step_text(nodes[n], delim, rec) in text
                               for n in linearize.path(nodes, t)[1:])])
    return visits


def show_nodes(tree, keep, width):
    nodes, kids = tree["nodes"], linearize.children(tree["nodes"])

    def line(n, prefix, last):
        node = nodes[n]
        text = node["text"].replace("\n", "⏎")
        text = text if len(text) <= width else text[: width - 1] + "…"
        verdict = ""
        if node["terminal"]:
            verdict = "  correct" if node["reward"] == 1 else f"  wrong (answer {node['answer']!r})"
        stats = f"prior {node['prior']:.2f}  N {node['N']:>3}  Q {node['Q']:.2f}"
        print(f"{prefix}{'└─' if last else '├─'} [{n}] {stats}  {text}{verdict}")
        shown = [c for c in kids[n] if c in keep]
        for i, c in enumerate(shown):
            line(c, prefix + ("   " if last else "│  "), i == len(shown) - 1)

    root = nodes[0]
    print(f"[0] root  N {root['N']}  Q {root['Q']:.2f}")
    shown = [c for c in kids[0] if c in keep]
    for i, c in enumerate(shown):
        line(c, "", i == len(shown) - 1)


def show_trace(tree, text, title):
    """The trace, one line per row, each step line tagged with the node whose text it copies."""
    nodes, delim = tree["nodes"], tasks.step_delimiter(tree["problem"])
    print(f"\n--- {title}")
    rows = text[: -len(delim)] if text.endswith(delim) else text
    for row in rows.split(delim):
        hit = [n["id"] for n in nodes[1:] if n["text"].rstrip(delim) == row]
        tag = "" if row.startswith(common.REFLECT) else "|".join(map(str, hit)) or "?"
        print(f"  {f'[{tag}]' if tag else '':>8} {row}")


def main(cfg):
    lcfg = common.parse_config(linearize.Config, [cfg.linearize] if cfg.linearize else [])
    tree = pick_tree(linearize.read_trees(cfg.trees), cfg.id)
    nodes = tree["nodes"]
    astro = linearize.astro_traces(tree, lcfg, Counter())
    direct = linearize.direct_traces(tree, lcfg, astro)
    keep = set(range(len(nodes)))
    if cfg.paths_only:
        keep = {n for ends in used_terminals(tree, [t[:2] for t in astro] + direct) for t in ends
                for n in linearize.path(nodes, t)}
    good, bad = linearize.terminals(nodes)
    print(f"tree {tree['id']}: {tree['problem']['problem']}")
    print(f"{len(nodes)} nodes, {len(good)} correct and {len(bad)} wrong terminals"
          f"{'; showing the paths the traces take' if cfg.paths_only else ''}\n")
    show_nodes(tree, keep, cfg.width)
    for j, (text, meta, _) in enumerate(astro):
        show_trace(tree, text, f"ASTRO trace {j}: k={meta['k']} wrong attempts, "
                               f"{meta['backtracks']} backtracks")
    for j, (text, _) in enumerate(direct):
        show_trace(tree, text, f"Direct trace {j}")


if __name__ == "__main__":
    common.run_main(main, Config)
