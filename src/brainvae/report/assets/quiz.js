// The readers' page of `brainvae quiz make`: answers kept in localStorage, exported as CSV.
// QUIZ_ID is defined by the page before this script.
var STORE_KEY = "brainvae-quiz-" + QUIZ_ID;
function items() { return Array.prototype.slice.call(document.querySelectorAll(".item")); }
function checked(name) {
  var el = document.querySelector('input[name="' + name + '"]:checked');
  return el ? el.value : "";
}
function field(s) { s = String(s); return /[",\r\n]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s; }
function answersCsv() {
  var reader = document.getElementById("reader").value.trim();
  var lines = ["quiz_id,item,answer,confidence,reader"];
  items().forEach(function (it) {
    var id = it.dataset.item;
    lines.push([QUIZ_ID, id, checked(id + "-answer"), checked(id + "-confidence"), reader].map(field).join(","));
  });
  return lines.join("\n") + "\n";
}
function update() {
  var done = 0, state = {reader: document.getElementById("reader").value, answers: {}};
  items().forEach(function (it) {
    var id = it.dataset.item, a = checked(id + "-answer"), c = checked(id + "-confidence");
    var complete = a !== "" && c !== "";
    it.classList.toggle("done", complete);
    if (complete) done++;
    state.answers[id] = [a, c];
  });
  document.getElementById("progress").textContent = done + " of " + items().length + " answered";
  try { localStorage.setItem(STORE_KEY, JSON.stringify(state)); } catch (e) { /* storage may be disabled */ }
  return done;
}
function restore() {
  var state = null;
  try { state = JSON.parse(localStorage.getItem(STORE_KEY) || "null"); } catch (e) { state = null; }
  if (!state) return;
  document.getElementById("reader").value = state.reader || "";
  Object.keys(state.answers || {}).forEach(function (id) {
    var v = state.answers[id];
    [[id + "-answer", v[0]], [id + "-confidence", v[1]]].forEach(function (p) {
      var el = document.querySelector('input[name="' + p[0] + '"][value="' + p[1] + '"]');
      if (el) el.checked = true;
    });
  });
}
function csvBlobUrl(text) { return URL.createObjectURL(new Blob([text], {type: "text/csv"})); }
function exportCsv() {
  var done = update(), total = items().length;
  var text = answersCsv();
  var reader = document.getElementById("reader").value.trim() || "reader";
  var a = document.createElement("a");
  a.href = csvBlobUrl(text);
  a.download = "answers-" + reader.replace(/[^A-Za-z0-9_-]+/g, "_") + ".csv";
  document.body.appendChild(a);
  a.click();
  setTimeout(function () { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
  document.getElementById("status").textContent = done < total
    ? "Exported, but " + (total - done) + " image(s) are not answered yet." : "Exported all " + total + " answers.";
  return text;
}
document.getElementById("export").addEventListener("click", exportCsv);
document.querySelector(".quiz").addEventListener("change", update);
document.getElementById("reader").addEventListener("input", update);
if (location.hash === "#selftest") {
  // Test hook: answer every item, then put the exported CSV into the page (no download).
  document.getElementById("reader").value = "selftest";
  items().forEach(function (it, i) {
    var id = it.dataset.item;
    document.querySelector('input[name="' + id + '-answer"][value="' + (i % 2 ? "real" : "synthetic") + '"]').checked = true;
    document.querySelector('input[name="' + id + '-confidence"][value="' + (1 + i % 5) + '"]').checked = true;
  });
  update();
  var text = answersCsv();
  var url = csvBlobUrl(text);
  URL.revokeObjectURL(url);
  document.getElementById("csv-out").textContent = text;
  document.body.dataset.exported = url.indexOf("blob:") === 0 ? "yes" : "no";
} else {
  restore();
  update();
}
