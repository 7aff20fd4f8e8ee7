// Image upload for a prediction: plain XHR (progress events) to the streamed API route, with the
// session's CSRF token in the header (the server never parses the body as a form to find it).
// On 202 the predictions panel is reloaded; it then polls itself until the worker is done.
(function () {
  "use strict";
  var form = document.getElementById("predict-form");
  if (!form) { return; }
  var bar = document.getElementById("predict-progress");
  var status = document.getElementById("predict-status");
  var csrf = JSON.parse(document.body.getAttribute("hx-headers") || "{}")["X-CSRF-Token"] || "";

  function reloadPanel() {
    if (window.htmx) {
      window.htmx.ajax("GET", form.getAttribute("data-panel"), { target: "#predictions-panel", swap: "outerHTML" });
    }
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var button = form.querySelector("button[type=submit]");
    var xhr = new XMLHttpRequest();
    xhr.open("POST", form.getAttribute("action"));
    xhr.setRequestHeader("X-CSRF-Token", csrf);
    xhr.setRequestHeader("Accept", "application/json");
    xhr.upload.addEventListener("progress", function (e) {
      if (e.lengthComputable) {
        bar.value = Math.round((100 * e.loaded) / e.total);
        status.textContent = "Uploading… " + bar.value + " %";
      }
    });
    xhr.addEventListener("load", function () {
      var body = {};
      try { body = JSON.parse(xhr.responseText); } catch (err) { body = {}; }
      button.disabled = false;
      bar.hidden = true;
      if (xhr.status === 202) {
        status.textContent = "Uploaded; a worker is predicting.";
        form.reset();
        reloadPanel();
        return;
      }
      var detail = body.detail;
      if (Array.isArray(detail)) { detail = detail.map(function (d) { return d.msg || d.message; }).join("; "); }
      status.textContent = "Refused: " + (detail || ("HTTP " + xhr.status));
    });
    xhr.addEventListener("error", function () {
      button.disabled = false;
      bar.hidden = true;
      status.textContent = "The upload was interrupted. Check the connection and try again.";
    });
    button.disabled = true;
    bar.hidden = false;
    bar.value = 0;
    status.textContent = "Uploading…";
    xhr.send(new FormData(form));
  });
})();
