"""Applications: tools that combine the stages (the demo, benchmarks, export to a diffusers folder, the web
app and fault injection). Nothing below this layer imports from it (an import-linter contract)."""
