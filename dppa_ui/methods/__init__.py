"""The merge methods, one short file each, to be read beside its paper.

prune:   magnitude.py (TIES trim) | dare.py (random drop + rescale) | dp.py (DPPA dynamic pruning)
amplify: dpa.py (DPPA dynamic partition amplification, and its greedy alpha search)
combine: sum.py (task arithmetic) | ties.py (sign election + disjoint mean) | pcb.py (PCB-Merging)
select.py holds the exact top-k selection they share.
"""
from .dare import dare_prune, random_mask, tensor_generator
from .dp import DPDensity, block_key, block_of, dp_densities, dp_densities_from_deltas, dp_prune, is_dp_target
from .dpa import AlphaSearchResult, GreedyAlphaWalk, band_edges, dpa_amplify, greedy_alpha_search, official_start
from .magnitude import magnitude_mask, magnitude_prune
from .pcb import pcb_combine, pcb_scale
from .select import keep_count, kth_largest, topk_mask
from .sum import sum_combine
from .ties import agreement_mask, elect_sign, ties_combine

__all__ = [
    "dare_prune", "random_mask", "tensor_generator", "DPDensity", "block_key", "block_of", "dp_densities",
    "dp_densities_from_deltas", "dp_prune", "is_dp_target", "AlphaSearchResult", "GreedyAlphaWalk", "band_edges",
    "dpa_amplify", "official_start",
    "greedy_alpha_search", "magnitude_mask", "magnitude_prune", "pcb_combine", "pcb_scale", "keep_count",
    "kth_largest", "topk_mask", "sum_combine", "agreement_mask", "elect_sign", "ties_combine",
]
