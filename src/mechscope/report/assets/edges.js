// Sortable tables: clicking a header sorts the rows by that column (numbers by their data-v value,
// missing values last), a second click reverses the order.
(function () {
  document.querySelectorAll('#edges table.sortable').forEach(table => {
    const headers = Array.from(table.querySelectorAll('thead th'));
    headers.forEach((th, col) => th.addEventListener('click', () => {
      const numeric = th.dataset.num === '1';
      const descending = th.dataset.order !== 'desc';
      headers.forEach(h => { delete h.dataset.order; });
      th.dataset.order = descending ? 'desc' : 'asc';
      const body = table.tBodies[0];
      const rows = Array.from(body.rows);
      const key = r => {
        const cell = r.children[col];
        if (!numeric) return cell.textContent;
        return cell.dataset.v === '' ? null : parseFloat(cell.dataset.v);
      };
      rows.sort((a, b) => {
        const x = key(a), y = key(b);
        if (x === null || y === null) return (x === null) - (y === null);
        const order = numeric ? x - y : (x < y ? -1 : x > y ? 1 : 0);  // code-point order
        return descending ? -order : order;
      });
      rows.forEach(r => body.appendChild(r));
    }));
  });
})();
