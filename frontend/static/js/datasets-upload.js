// Dataset upload page. With tus-js-client (vendored), the archive is sent as a resumable upload to
// /api/v1/datasets/uploads in 16 MiB chunks: a dropped connection is retried, and choosing the same
// file again after a reload resumes where it stopped. Without it, one multipart POST to
// /api/v1/datasets with XHR. Either way the session's CSRF token travels in X-CSRF-Token; the page
// shows percent, speed and time left, then opens the dataset's page (live validation progress).
(function () {
  "use strict";
  var form = document.getElementById("upload-form");
  if (!form) return;
  var bar = document.getElementById("upload-bar");
  var text = document.getElementById("upload-text");
  var box = document.getElementById("upload-progress");
  var error = document.getElementById("upload-error");

  function human(bytes) {
    var units = ["B", "KiB", "MiB", "GiB", "TiB"];
    var i = 0;
    while (bytes >= 1024 && i < units.length - 1) { bytes /= 1024; i++; }
    return (i === 0 ? bytes.toFixed(0) : bytes.toFixed(1)) + " " + units[i];
  }
  function duration(seconds) {
    if (!isFinite(seconds)) return "…";
    seconds = Math.round(seconds);
    if (seconds < 60) return seconds + " s";
    var m = Math.floor(seconds / 60), s = seconds % 60;
    if (m < 60) return m + " min " + s + " s";
    return Math.floor(m / 60) + " h " + (m % 60) + " min";
  }
  function fail(message) {
    error.textContent = message;
    error.hidden = false;
    form.querySelector("button").disabled = false;
  }

  function show(loaded, total, base, started) {
    // base: bytes already stored before this session (a resumed upload); speed counts the rest.
    var seconds = (Date.now() - started) / 1000;
    var speed = seconds > 0 ? (loaded - base) / seconds : 0;
    bar.value = Math.round(100 * loaded / total);
    text.textContent = bar.value + "% · " + human(loaded) + " of " + human(total) +
      " · " + human(speed) + "/s · " + duration(speed > 0 ? (total - loaded) / speed : Infinity) + " left";
  }

  function startTus(file, name) {
    var started = Date.now();
    var base = null;
    var upload = new window.tus.Upload(file, {
      endpoint: "/api/v1/datasets/uploads",
      chunkSize: 16 * 1024 * 1024,
      retryDelays: [0, 1000, 3000, 5000, 10000, 20000],
      removeFingerprintOnSuccess: true,
      metadata: { name: name, filename: file.name },
      headers: { "X-CSRF-Token": form.dataset.csrf, "Accept": "application/json" },
      onProgress: function (loaded, total) {
        if (base === null) base = loaded;
        show(loaded, total, base, started);
      },
      onSuccess: function () {
        text.textContent = "Uploaded; validating…";
        window.location.assign("/datasets/" + upload.url.split("/").pop());
      },
      onError: function (err) {
        var detail = "The upload failed.";
        var response = err && err.originalResponse;
        if (response) {
          try { detail = JSON.parse(response.getBody()).detail || detail; } catch (ignored) { detail = String(err); }
        }
        box.hidden = true;
        fail(detail);
      }
    });
    upload.findPreviousUploads().then(function (previous) {
      if (previous.length) {
        text.textContent = "Resuming the previous upload of this file…";
        upload.resumeFromPreviousUpload(previous[0]);
      }
      upload.start();
    });
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    error.hidden = true;
    var file = document.getElementById("upload-file").files[0];
    var name = document.getElementById("upload-name").value.trim();
    if (!file || !name) { fail("Choose a file and give the dataset a name."); return; }
    if (file.size > Number(form.dataset.maxBytes)) {
      fail("The file is " + human(file.size) + "; the limit is " + human(Number(form.dataset.maxBytes)) + ".");
      return;
    }
    if (file.size > Number(form.dataset.leftBytes)) {
      fail("The file is " + human(file.size) + " but only " + human(Number(form.dataset.leftBytes)) + " of your quota is left.");
      return;
    }
    form.querySelector("button").disabled = true;
    box.hidden = false;
    bar.value = 0;
    text.textContent = "Starting…";
    if (window.tus && window.tus.isSupported) { startTus(file, name); return; }
    var data = new FormData();
    data.append("name", name);  // before the file: the server reads the form as a stream
    data.append("file", file);
    var xhr = new XMLHttpRequest();
    var started = Date.now();
    xhr.open("POST", "/api/v1/datasets");
    xhr.setRequestHeader("X-CSRF-Token", form.dataset.csrf);
    xhr.setRequestHeader("Accept", "application/json");
    xhr.upload.addEventListener("progress", function (e) {
      if (e.lengthComputable) show(e.loaded, e.total, 0, started);
    });
    xhr.addEventListener("load", function () {
      var body = null;
      try { body = JSON.parse(xhr.responseText); } catch (ignored) { body = null; }
      if (xhr.status === 201 && body) {
        text.textContent = "Uploaded; validating…";
        window.location.assign("/datasets/" + body.id);
      } else {
        var detail = body && typeof body.detail === "string" ? body.detail : "The upload failed (HTTP " + xhr.status + ").";
        box.hidden = true;
        fail(detail);
      }
    });
    xhr.addEventListener("error", function () { box.hidden = true; fail("The connection was lost during the upload. Try again."); });
    xhr.send(data);
  });
})();
