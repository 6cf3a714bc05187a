// MathJax 3 settings for pymdownx.arithmatex (generic mode): render \( \) and \[ \] spans.
window.MathJax = {
  tex: { inlineMath: [["\\(", "\\)"]], displayMath: [["\\[", "\\]"]], processEscapes: true, processEnvironments: true },
  options: { ignoreHtmlClass: ".*|", processHtmlClass: "arithmatex" },
};
// Re-render after Material's instant navigation swaps the page content.
if (typeof document$ !== "undefined") {
  document$.subscribe(() => { if (window.MathJax.typesetPromise) { MathJax.typesetPromise(); } });
}
