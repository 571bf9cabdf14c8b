"""The defaults of ``mlvar report html``, in a module that imports nothing: the CLI shows
them in its help without loading :mod:`mlvar.report.html` (pandas, jinja2)."""

#: Top-ranked samples that get a page (plus as many random unaffected ones).
TOP_DEFAULT = 50
