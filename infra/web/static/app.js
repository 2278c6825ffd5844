// incidentd dashboard: the dark-mode toggle and the self-refresh. The pages work without it.
(function () {
  "use strict";
  var KEY = "incidentd-theme";
  var root = document.documentElement;
  try {
    var saved = window.localStorage.getItem(KEY);
    if (saved === "dark" || saved === "light") { root.setAttribute("data-theme", saved); }
  } catch (e) { /* storage refused: follow the OS */ }

  function effective() {
    var chosen = root.getAttribute("data-theme");
    if (chosen) { return chosen; }
    return window.matchMedia && window.matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light";
  }

  function toggle() {
    var next = effective() === "dark" ? "light" : "dark";
    root.setAttribute("data-theme", next);
    try { window.localStorage.setItem(KEY, next); } catch (e) { /* kept for this page only */ }
  }

  // Replace the page's content with a fresh copy, unless the user is typing or has selected text.
  function refresh() {
    var active = document.activeElement;
    var busy = active && (active.tagName === "TEXTAREA" || active.tagName === "INPUT" || active.tagName === "SELECT");
    var selected = window.getSelection && String(window.getSelection()) !== "";
    if (document.hidden || busy || selected) { return; }
    fetch(window.location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (r) { return r.ok && !r.redirected ? r.text() : null; })
      .then(function (html) {
        if (html === null) { return; }
        var fresh = new DOMParser().parseFromString(html, "text/html").getElementById("content");
        var here = document.getElementById("content");
        // Only when something changed: the elements (and a half-made selection) stay otherwise.
        if (fresh && here && fresh.innerHTML !== here.innerHTML) { here.replaceWith(fresh); }
      })
      .catch(function () { /* offline for a moment: try again next time */ });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var button = document.getElementById("theme-toggle");
    if (button) {
      button.hidden = false;
      button.addEventListener("click", toggle);
    }
    var seconds = parseInt(document.body.getAttribute("data-refresh") || "0", 10);
    if (seconds > 0) { window.setInterval(refresh, seconds * 1000); }
  });
})();
