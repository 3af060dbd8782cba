// fedscan node, all-slices page (/slices): label buttons and auto-refresh of the table rows.
(function () {
  "use strict";
  const token = new URLSearchParams(window.location.search).get("token");
  const headers = token ? { Authorization: "Bearer " + token } : {};
  const withToken = (url) => (token ? url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token) : url);
  const rows = document.getElementById("rows");
  document.querySelectorAll('a[href^="/"]').forEach((a) => a.setAttribute("href", withToken(a.getAttribute("href"))));
  let busy = false;

  rows.addEventListener("click", async (event) => {
    const button = event.target.closest("button.label");
    if (!button) return;
    const tr = button.closest("tr");
    button.disabled = true;
    try {
      const response = await fetch("/api/labels", {
        method: "POST",
        headers: Object.assign({ "Content-Type": "application/json" }, headers),
        body: JSON.stringify({ sop_instance_uid: tr.dataset.uid, label: button.dataset.label, who: "web" }),
      });
      const result = await response.json();
      tr.querySelector("td.human").textContent = response.ok ? button.dataset.label : "error: " + result.error;
    } catch (err) {
      tr.querySelector("td.human").textContent = "error: " + err;
    } finally {
      button.disabled = false;
    }
  });

  async function refresh() {
    if (busy) return;
    busy = true;
    try {
      const response = await fetch(withToken("/slices?fragment=rows"), { headers });
      if (response.ok) {
        rows.innerHTML = await response.text();
        document.getElementById("count").textContent = rows.querySelectorAll("tr[data-id]").length;
      }
    } finally {
      busy = false;
    }
  }
  setInterval(refresh, 5000);
})();
