// The first screen of a chapter: the question (the page's first paragraph), then the headline -- the verdict of
// the paper's claims on this page (added up from the verdict lines regcls.page.verdict_line writes beside each
// claims table, linked to the first of them) and the page's first figure -- above any code. The page itself keeps
// the paper's order (question, measurement, figure, finding, claims), as the notebook on Colab does.
document.addEventListener("DOMContentLoaded", () => {
  const article = document.querySelector("article.bd-article") || document.querySelector("main");
  if (!article || article.querySelector(".regcls-headline")) return;
  const h1 = article.querySelector("h1");
  const lines = Array.from(article.querySelectorAll(".regcls-verdict"));
  const figure = article.querySelector("figure");
  if (!h1 || (!lines.length && !figure)) return;
  const box = document.createElement("div");
  box.className = "regcls-headline";
  if (lines.length) {
    const words = {"yes": "agree", "no": "do not", "not-testable": "not testable", "not-computed": "not computed"};
    const parts = [];
    for (const [key, word] of Object.entries(words)) {
      const n = lines.reduce((sum, el) => sum + Number(el.getAttribute("data-" + key) || 0), 0);
      if (n) parts.push(`<span class="regcls-v-${key}">${n} ${word}</span>`);
    }
    const p = document.createElement("p");
    p.className = "regcls-headline-verdict";
    const profile = lines[0].getAttribute("data-profile");
    p.innerHTML = `<b>Claims here, ${profile} profile:</b> ${parts.join(" &middot; ") || "no rows"}`
      + ` (<a href="#${lines[0].id}">rows</a>)`;
    box.appendChild(p);
  }
  if (figure) {
    const copy = figure.cloneNode(true);
    copy.querySelectorAll("[id]").forEach(el => el.removeAttribute("id"));
    copy.removeAttribute("id");
    copy.querySelectorAll("a.headerlink").forEach(el => el.remove());
    const link = document.createElement("a");
    link.href = "#" + (figure.id || "");
    link.textContent = " (in context below)";
    const caption = copy.querySelector("figcaption p") || copy.querySelector("figcaption");
    if (caption && figure.id) caption.appendChild(link);
    box.appendChild(copy);
  }
  let question = h1.nextElementSibling;
  while (question && question.tagName !== "P") question = question.nextElementSibling;
  (question || h1).after(box);
  // the figure fits the first screen below the question (at least 240 px tall); again once fonts and math settle
  const fit = () => {
    const img = box.querySelector("img");
    if (!img) return;
    const top = img.getBoundingClientRect().top + window.scrollY;
    img.style.maxHeight = Math.max(240, Math.min(430, window.innerHeight - top - 12)) + "px";
  };
  fit();
  window.addEventListener("load", fit);
});
