"""Reference encoding: hierarchical CLIP features, HMoE fusion, DINO features, fusion chart."""
