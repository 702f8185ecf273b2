"""Results: per-example records to statistics, the report (results.md, table.tex, plots), the variant comparison."""
