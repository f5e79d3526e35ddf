"""The tools around the recipe, one module per command: sweep, plan, bench (with the named shapes they
share), prune and cache-teacher front ends. They sit above the core and may import any of it; the core
never imports them."""
