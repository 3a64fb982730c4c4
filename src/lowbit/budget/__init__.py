"""Mixed precision under a budget: per-layer sensitivity, a knapsack allocator, plans as recipes."""
