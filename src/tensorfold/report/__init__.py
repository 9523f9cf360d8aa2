"""Reports of compressions: a self-contained HTML page with plots (matplotlib, Agg) embedded as PNG."""

from tensorfold.report.html import png_tag, render_report, table_html, write_report

__all__ = ["png_tag", "render_report", "table_html", "write_report"]
