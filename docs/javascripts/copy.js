// Copy buttons of ```pycon and ```console blocks copy the commands only: the lines after
// the ">>> " / "... " (or "$ ") prompts, without the prompts and without the printed output.
// Material's copy button copies the data-copy attribute of the block when it has one.
const tensormoePrompts = { "language-pycon": [">>> ", "... "], "language-console": ["$ "] };

function tensormoeCopyCommandsOnly() {
  for (const [language, prompts] of Object.entries(tensormoePrompts)) {
    document.querySelectorAll(`div.${language}`).forEach((block) => {
      const code = block.querySelector("pre > code");
      if (!code) { return; }
      const lines = [];
      for (const line of code.textContent.split("\n")) {
        const prompt = prompts.find((p) => line.startsWith(p) || line === p.trimEnd());
        if (prompt !== undefined) { lines.push(line.slice(prompt.length)); }
      }
      block.setAttribute("data-copy", lines.join("\n"));
    });
  }
}
if (typeof document$ !== "undefined") {
  document$.subscribe(tensormoeCopyCommandsOnly);  // after Material's instant navigation too
} else {
  document.addEventListener("DOMContentLoaded", tensormoeCopyCommandsOnly);
}
