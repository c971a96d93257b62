//! A contrario segmentation on the tree of upper level sets (U-Flow, Tailanian et al., JMIV 2024).
//!
//! Per scale, u = Σ_c z² is χ²(C) under the null hypothesis. The connected components of the upper
//! level sets of u form a max-tree; each component R of level λ gets the Chernoff bound
//! log10 PFA(R) = |R|·(C / 2 ln 10)·(1 + ln(λ/C) − λ/C), the tree is pruned and merged by PFA until
//! stable, and its leaves are the detected regions. Scales are merged by the minimum log PFA and the
//! polyomino count turns it into a log10 NFA.
//!
//! Deviation from the thesis and the reference code: the Chernoff bound only holds for λ > C, so for
//! λ ≤ C the per-pixel log PFA is clamped to 0 (otherwise large low-level regions look significant).

use vigil_core::{Map, Result, VigilError};

use crate::polyomino::log10_polyomino_tests;

const NO_PARENT: u32 = u32::MAX;

/// One connected component of an upper level set {u ≥ level}.
#[derive(Clone, Debug, PartialEq)]
pub struct MaxTreeNode {
    /// Index of the enclosing component (lower level), `None` for the root (the whole map).
    pub parent: Option<usize>,
    /// The component's level, which is also the minimum of u over it.
    pub level: f32,
    /// Number of pixels of the component, its sub-components included.
    pub area: usize,
}

/// The max-tree (component tree of upper level sets, 4-connectivity) of a 2-D map.
///
/// Nodes are ordered so that every parent comes before its children; node 0 is the root.
#[derive(Clone, Debug)]
pub struct MaxTree {
    pub width: usize,
    pub height: usize,
    pub nodes: Vec<MaxTreeNode>,
    /// For each pixel, the smallest component holding it (the node at the pixel's own level).
    pub pixel_node: Vec<usize>,
}

impl MaxTree {
    /// Builds the tree by union-find over the pixels in decreasing order (Berger et al. 2007),
    /// O(N log N) for the sort and near-linear for the unions.
    pub fn build(values: &[f32], width: usize, height: usize) -> Result<MaxTree> {
        let n = width * height;
        if n == 0 || values.len() != n {
            return Err(VigilError::invalid(format!(
                "max-tree: map holds {} values, expected a non-empty {width}x{height}",
                values.len()
            )));
        }
        if let Some(i) = values.iter().position(|v| v.is_nan()) {
            return Err(VigilError::invalid(format!("max-tree: NaN at x={}, y={}", i % width, i / width)));
        }
        // Decreasing value; ties by index so the tree is deterministic.
        let mut order: Vec<u32> = (0..n as u32).collect();
        order.sort_unstable_by(|&a, &b| values[b as usize].total_cmp(&values[a as usize]).then(a.cmp(&b)));

        let mut parent = vec![NO_PARENT; n];
        let mut zpar = vec![NO_PARENT; n];
        for &p in &order {
            parent[p as usize] = p;
            zpar[p as usize] = p;
            let (x, y) = (p as usize % width, p as usize / width);
            let mut neighbours = [NO_PARENT; 4];
            if x > 0 {
                neighbours[0] = p - 1;
            }
            if x + 1 < width {
                neighbours[1] = p + 1;
            }
            if y > 0 {
                neighbours[2] = p - width as u32;
            }
            if y + 1 < height {
                neighbours[3] = p + width as u32;
            }
            for q in neighbours {
                if q == NO_PARENT || zpar[q as usize] == NO_PARENT {
                    continue;
                }
                let r = find_root(&mut zpar, q);
                if r != p {
                    parent[r as usize] = p;
                    zpar[r as usize] = p;
                }
            }
        }

        // Canonicalise (root first): every pixel points at the canonical pixel of its level
        // component, and canonical pixels at the canonical pixel of the enclosing component.
        for &p in order.iter().rev() {
            let q = parent[p as usize];
            if values[parent[q as usize] as usize] == values[q as usize] {
                parent[p as usize] = parent[q as usize];
            }
        }

        let root = *order.last().expect("non-empty map");
        let is_canonical = |p: u32| p == root || values[parent[p as usize] as usize] != values[p as usize];
        // Root-first numbering so parents precede children.
        let mut node_of_canonical = vec![NO_PARENT; n];
        let mut nodes = Vec::new();
        for &p in order.iter().rev() {
            if is_canonical(p) {
                let parent_node = if p == root {
                    None
                } else {
                    Some(node_of_canonical[parent[p as usize] as usize] as usize)
                };
                node_of_canonical[p as usize] = nodes.len() as u32;
                nodes.push(MaxTreeNode { parent: parent_node, level: values[p as usize], area: 0 });
            }
        }
        let pixel_node: Vec<usize> = (0..n)
            .map(|p| {
                let canonical = if is_canonical(p as u32) { p } else { parent[p] as usize };
                node_of_canonical[canonical] as usize
            })
            .collect();
        for &node in &pixel_node {
            nodes[node].area += 1;
        }
        for i in (1..nodes.len()).rev() {
            let parent = nodes[i].parent.expect("only node 0 is the root");
            nodes[parent].area += nodes[i].area;
        }
        Ok(MaxTree { width, height, nodes, pixel_node })
    }
}

fn find_root(zpar: &mut [u32], p: u32) -> u32 {
    let mut root = p;
    while zpar[root as usize] != root {
        root = zpar[root as usize];
    }
    // Path compression keeps later finds short.
    let mut q = p;
    while zpar[q as usize] != root {
        let next = zpar[q as usize];
        zpar[q as usize] = root;
        q = next;
    }
    root
}

/// log10 of the Chernoff bound on P(χ²(dof) ≥ lambda), clamped to 0 where the bound does not hold
/// (lambda ≤ dof).
pub fn chi2_chernoff_log10_sf(lambda: f64, dof: f64) -> f64 {
    let ratio = lambda / dof;
    if ratio <= 1.0 {
        return 0.0;
    }
    dof / (2.0 * std::f64::consts::LN_10) * (1.0 + ratio.ln() - ratio)
}

/// The log10 PFA map of one scale: u = Σ_c z² (χ²(`dof`) under H0) → max-tree → PFA prune and
/// merge until stable → each final leaf region carries its log10 PFA; pixels outside every region
/// get 0 (probability one, as the reference code's NaN → 0).
pub fn tree_log10_pfa(u: &Map, dof: usize) -> Result<Map> {
    if dof == 0 {
        return Err(VigilError::invalid("NFA tree: the chi-square needs at least one degree of freedom"));
    }
    if let Some(i) = u.data.iter().position(|v| !v.is_finite() || *v < 0.0) {
        return Err(VigilError::invalid(format!(
            "NFA tree: sum of squares must be finite and >= 0, got {} at x={}, y={}",
            u.data[i],
            i % u.width,
            i / u.width
        )));
    }
    let tree = MaxTree::build(&u.data, u.width, u.height)?;
    let log_pfa: Vec<f64> = tree
        .nodes
        .iter()
        .map(|node| node.area as f64 * chi2_chernoff_log10_sf(node.level as f64, dof as f64))
        .collect();
    let mut pruned = PrunedTree::new(&tree, log_pfa);
    pruned.prune();
    while pruned.merge() {
        pruned.prune();
    }
    Ok(pruned.region_map(&tree))
}

/// The mutable copy of the tree the prune and merge procedures work on.
struct PrunedTree {
    parent: Vec<u32>,
    alive: Vec<bool>,
    log_pfa: Vec<f64>,
}

impl PrunedTree {
    fn new(tree: &MaxTree, log_pfa: Vec<f64>) -> Self {
        let parent = tree.nodes.iter().map(|n| n.parent.map_or(NO_PARENT, |p| p as u32)).collect();
        PrunedTree { parent, alive: vec![true; tree.nodes.len()], log_pfa }
    }

    fn child_counts(&self) -> Vec<u32> {
        let mut counts = vec![0u32; self.parent.len()];
        for (i, &p) in self.parent.iter().enumerate() {
            if self.alive[i] && p != NO_PARENT {
                counts[p as usize] += 1;
            }
        }
        counts
    }

    /// Procedure 1 (PFA prune): each branch (a leaf and the chain of ancestors that have that
    /// single child) keeps only its lowest-PFA node, which becomes a leaf in the branch's place.
    fn prune(&mut self) {
        let counts = self.child_counts();
        let leaves: Vec<usize> =
            (0..self.parent.len()).filter(|&i| self.alive[i] && counts[i] == 0).collect();
        for leaf in leaves {
            let mut best = leaf;
            let mut top = leaf;
            while self.parent[top] != NO_PARENT && counts[self.parent[top] as usize] == 1 {
                top = self.parent[top] as usize;
                // Strict: on ties the deepest node wins, as numpy's argmin from the leaf up.
                if self.log_pfa[top] < self.log_pfa[best] {
                    best = top;
                }
            }
            if best == leaf && top == leaf {
                continue;
            }
            let mut node = leaf;
            loop {
                let next = self.parent[node];
                if node != best {
                    self.alive[node] = false;
                }
                if node == top {
                    break;
                }
                node = next as usize;
            }
            self.parent[best] = self.parent[top];
        }
    }

    /// Procedure 2 (PFA merge): a node whose children are all leaves replaces them when it is at
    /// least as significant as the best of them. Returns whether anything merged.
    fn merge(&mut self) -> bool {
        let counts = self.child_counts();
        let n = self.parent.len();
        // Per node: how many children are not leaves, and the best log PFA among its children.
        let mut inner_children = vec![0u32; n];
        let mut best_child = vec![f64::INFINITY; n];
        for (i, &p) in self.parent.iter().enumerate() {
            if self.alive[i] && p != NO_PARENT {
                if counts[i] > 0 {
                    inner_children[p as usize] += 1;
                }
                best_child[p as usize] = best_child[p as usize].min(self.log_pfa[i]);
            }
        }
        let absorbs = |b: usize| {
            self.alive[b] && counts[b] > 1 && inner_children[b] == 0 && self.log_pfa[b] <= best_child[b]
        };
        let absorbing: Vec<bool> = (0..n).map(absorbs).collect();
        let mut merged = false;
        for i in 0..n {
            let p = self.parent[i];
            if self.alive[i] && p != NO_PARENT && absorbing[p as usize] {
                self.alive[i] = false;
                merged = true;
            }
        }
        merged
    }

    /// Leaves of the final tree are disjoint regions: a pixel belongs to the one whose original
    /// subtree holds it, i.e. its nearest surviving ancestor, when that ancestor is a leaf.
    fn region_map(&self, tree: &MaxTree) -> Map {
        let counts = self.child_counts();
        let n = tree.nodes.len();
        let mut region = vec![NO_PARENT; n];
        for i in 0..n {
            region[i] = match (self.alive[i], tree.nodes[i].parent) {
                (true, _) => i as u32,
                (false, Some(parent)) => region[parent],
                // A pruned root: its own pixels lie in no region.
                (false, None) => NO_PARENT,
            };
        }
        let data = tree
            .pixel_node
            .iter()
            .map(|&node| {
                let r = region[node];
                if r != NO_PARENT && counts[r as usize] == 0 {
                    self.log_pfa[r as usize] as f32
                } else {
                    0.0
                }
            })
            .collect();
        Map { width: tree.width, height: tree.height, data }
    }
}

/// One scale's evidence for the tree NFA: u = Σ_c z² over `dof` channels.
#[derive(Clone, Debug)]
pub struct Chi2Map {
    pub u: Map,
    pub dof: usize,
}

/// The merged log10 NFA map at `width`×`height`: per scale the tree log PFA, bilinearly up-sampled,
/// the minimum over scales, plus log10 N_T from the polyomino count over all scales.
/// A pixel is detected at level k where the result is ≤ −k.
pub fn tree_log10_nfa(scales: &[Chi2Map], width: usize, height: usize) -> Result<Map> {
    if scales.is_empty() {
        return Err(VigilError::invalid("NFA tree: no scales given"));
    }
    let log_tests = log10_polyomino_tests(&scales.iter().map(|s| s.u.width * s.u.height).collect::<Vec<_>>());
    let mut merged = Map::filled(width, height, 0.0);
    for scale in scales {
        let log_pfa = tree_log10_pfa(&scale.u, scale.dof)?.resize_bilinear(width, height);
        for (m, v) in merged.data.iter_mut().zip(&log_pfa.data) {
            *m = m.min(*v);
        }
    }
    for m in merged.data.iter_mut() {
        *m = (*m as f64 + log_tests) as f32;
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(width: usize, height: usize, data: Vec<f32>) -> Map {
        Map::new(width, height, data).unwrap()
    }

    #[test]
    fn max_tree_of_two_peaks() {
        // 1-D profile 0 2 1 3 3: root {all} at 0, {2,1,3,3} at 1, then {2} and {3,3} as leaves.
        let tree = MaxTree::build(&[0.0, 2.0, 1.0, 3.0, 3.0], 5, 1).unwrap();
        assert_eq!(tree.nodes.len(), 4);
        assert_eq!(tree.nodes[0], MaxTreeNode { parent: None, level: 0.0, area: 5 });
        let level_one = tree.pixel_node[2];
        assert_eq!(tree.nodes[level_one].area, 4);
        assert_eq!(tree.nodes[level_one].parent, Some(0));
        let (peak_a, peak_b) = (tree.pixel_node[1], tree.pixel_node[3]);
        assert_eq!(tree.pixel_node[4], peak_b, "equal neighbouring values share a node");
        assert_eq!(tree.nodes[peak_a].area, 1);
        assert_eq!(tree.nodes[peak_b].area, 2);
        assert_eq!(tree.nodes[peak_a].parent, Some(level_one));
        assert_eq!(tree.nodes[peak_b].parent, Some(level_one));
    }

    #[test]
    fn max_tree_uses_four_connectivity() {
        // The two 5s touch only diagonally: two separate components.
        let tree = MaxTree::build(&[5.0, 0.0, 0.0, 5.0], 2, 2).unwrap();
        assert_eq!(tree.nodes.len(), 3);
        assert_ne!(tree.pixel_node[0], tree.pixel_node[3]);
    }

    #[test]
    fn max_tree_matches_brute_force_components() {
        // Pseudo-random map with repeated values; every node's area equals the size of the
        // 4-connected component of {v >= level} holding one of its pixels.
        let (w, h) = (9, 7);
        let mut state = 12345u32;
        let values: Vec<f32> = (0..w * h)
            .map(|_| {
                state = state.wrapping_mul(1664525).wrapping_add(1013904223);
                ((state >> 24) % 6) as f32
            })
            .collect();
        let tree = MaxTree::build(&values, w, h).unwrap();
        for p in 0..w * h {
            let node = &tree.nodes[tree.pixel_node[p]];
            assert_eq!(node.level, values[p]);
            let mut seen = vec![false; w * h];
            let mut stack = vec![p];
            seen[p] = true;
            let mut size = 0;
            while let Some(q) = stack.pop() {
                size += 1;
                let (x, y) = (q % w, q / w);
                let mut push = |r: usize| {
                    if !seen[r] && values[r] >= node.level {
                        seen[r] = true;
                        stack.push(r);
                    }
                };
                if x > 0 {
                    push(q - 1);
                }
                if x + 1 < w {
                    push(q + 1);
                }
                if y > 0 {
                    push(q - w);
                }
                if y + 1 < h {
                    push(q + w);
                }
            }
            assert_eq!(node.area, size, "pixel {p}");
            if let Some(parent) = node.parent {
                assert!(tree.nodes[parent].level < node.level);
                assert!(parent < tree.pixel_node[p], "parents come first");
            }
        }
    }

    #[test]
    fn chernoff_bound_is_clamped_and_bounds_the_tail() {
        assert_eq!(chi2_chernoff_log10_sf(3.0, 4.0), 0.0);
        assert_eq!(chi2_chernoff_log10_sf(4.0, 4.0), 0.0);
        // P(χ²(2) ≥ x) = exp(−x/2) exactly; the bound must lie above it.
        for x in [3.0f64, 6.0, 20.0, 100.0] {
            let exact = -x / 2.0 / std::f64::consts::LN_10;
            let bound = chi2_chernoff_log10_sf(x, 2.0);
            assert!(bound < 0.0 && bound >= exact, "x={x}: bound {bound} vs exact {exact}");
        }
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(MaxTree::build(&[1.0, 2.0], 3, 1).is_err());
        assert!(MaxTree::build(&[1.0, f32::NAN], 2, 1).is_err());
        assert!(tree_log10_pfa(&map(2, 1, vec![1.0, -1.0]), 4).is_err());
        assert!(tree_log10_pfa(&map(2, 1, vec![1.0, 1.0]), 0).is_err());
        assert!(tree_log10_nfa(&[], 4, 4).is_err());
    }

    #[test]
    fn one_strong_blob_is_the_only_region() {
        // Background at u = C (log PFA 0), a 3×3 blob at u = 10·C with a brighter centre.
        let (w, h, c) = (12usize, 10usize, 8usize);
        let mut u = vec![c as f32; w * h];
        for y in 3..6 {
            for x in 4..7 {
                u[y * w + x] = 10.0 * c as f32;
            }
        }
        u[4 * w + 5] = 12.0 * c as f32;
        let pfa = tree_log10_pfa(&map(w, h, u), c).unwrap();
        // The 9-pixel component at level 10C beats the single brighter pixel.
        let expected = 9.0 * chi2_chernoff_log10_sf(10.0 * c as f64, c as f64);
        for y in 0..h {
            for x in 0..w {
                let v = pfa.get(y, x) as f64;
                if (3..6).contains(&y) && (4..7).contains(&x) {
                    assert!((v - expected).abs() < 1e-3 * expected.abs(), "({x},{y}) = {v}");
                } else {
                    assert_eq!(v, 0.0, "({x},{y})");
                }
            }
        }
    }

    #[test]
    fn two_separate_blobs_stay_two_regions() {
        let (w, h, c) = (16usize, 6usize, 4usize);
        let mut u = vec![1.0f32; w * h];
        for y in 1..4 {
            for x in 1..4 {
                u[y * w + x] = 40.0;
            }
            for x in 10..14 {
                u[y * w + x] = 30.0;
            }
        }
        let pfa = tree_log10_pfa(&map(w, h, u), c).unwrap();
        let left = 9.0 * chi2_chernoff_log10_sf(40.0, c as f64);
        let right = 12.0 * chi2_chernoff_log10_sf(30.0, c as f64);
        assert!((pfa.get(2, 2) as f64 - left).abs() < 1e-3 * left.abs());
        assert!((pfa.get(2, 12) as f64 - right).abs() < 1e-3 * right.abs());
        assert_eq!(pfa.get(0, 0), 0.0);
        assert_eq!(pfa.get(2, 7), 0.0);
    }

    #[test]
    fn a_significant_parent_absorbs_weak_children() {
        // A wide plateau at 6C holding two single-pixel bumps at 6.5C: the plateau (many pixels)
        // is far more significant than either bump, so merge keeps the plateau as one region.
        let (w, h, c) = (10usize, 6usize, 4usize);
        let mut u = vec![1.0f32; w * h];
        for y in 1..5 {
            for x in 1..9 {
                u[y * w + x] = 24.0;
            }
        }
        u[2 * w + 2] = 26.0;
        u[3 * w + 7] = 26.0;
        let pfa = tree_log10_pfa(&map(w, h, u), c).unwrap();
        let plateau = 32.0 * chi2_chernoff_log10_sf(24.0, c as f64);
        for y in 1..5 {
            for x in 1..9 {
                assert!((pfa.get(y, x) as f64 - plateau).abs() < 1e-3 * plateau.abs(), "({x},{y})");
            }
        }
    }

    #[test]
    fn pure_noise_level_map_gives_no_detection() {
        // u at or below its expectation everywhere: every bound is clamped, nothing is detected.
        let (w, h, c) = (14usize, 14usize, 16usize);
        let u: Vec<f32> = (0..w * h).map(|i| (i % 7) as f32 * 2.0 + 2.0).collect();
        let nfa = tree_log10_nfa(&[Chi2Map { u: map(w, h, u), dof: c }], 28, 28).unwrap();
        let log_tests = log10_polyomino_tests(&[w * h]) as f32;
        assert!(nfa.data.iter().all(|&v| (v - log_tests).abs() < 1e-3));
    }

    #[test]
    fn chi_square_noise_gives_no_false_detection() {
        // Under H0 (u = Σ of C squared standard normals) the expected number of false detections
        // is at most 1; over several maps there should be none at all.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut uniform = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        let c = 16usize;
        for _ in 0..5 {
            let mut chi2 = |side: usize| {
                let u = (0..side * side)
                    .map(|_| {
                        (0..c)
                            .map(|_| {
                                let z = (-2.0 * uniform().ln()).sqrt()
                                    * (std::f64::consts::TAU * uniform()).cos();
                                (z * z) as f32
                            })
                            .sum()
                    })
                    .collect();
                Chi2Map { u: map(side, side, u), dof: c }
            };
            let scales = [chi2(16), chi2(8)];
            let nfa = tree_log10_nfa(&scales, 32, 32).unwrap();
            assert!(nfa.min() > 0.0, "false detection: log10 NFA {}", nfa.min());
        }
    }

    #[test]
    fn scales_merge_by_minimum_and_detect_the_anomaly() {
        let c = 16usize;
        let mut fine = vec![c as f32 * 0.9; 16 * 16];
        for y in 6..10 {
            for x in 6..10 {
                fine[y * 16 + x] = 12.0 * c as f32;
            }
        }
        let mut coarse = vec![c as f32 * 0.9; 8 * 8];
        coarse[3 * 8 + 3] = 5.0 * c as f32;
        let scales = [Chi2Map { u: map(16, 16, fine), dof: c }, Chi2Map { u: map(8, 8, coarse), dof: c }];
        let nfa = tree_log10_nfa(&scales, 32, 32).unwrap();
        let log_tests = log10_polyomino_tests(&[256, 64]);
        let fine_pfa = 16.0 * chi2_chernoff_log10_sf(12.0 * c as f64, c as f64);
        assert!(fine_pfa + log_tests < 0.0, "the test blob must be meaningful");
        // Centre of the blob: fine scale wins (it is far lower than the coarse single pixel).
        assert!((nfa.get(16, 16) as f64 - (fine_pfa + log_tests)).abs() < 1e-2 * fine_pfa.abs());
        // Far corner: nothing detected.
        assert!((nfa.get(0, 31) as f64 - log_tests).abs() < 1e-3);
    }
}
