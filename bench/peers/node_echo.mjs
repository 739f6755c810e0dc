// The echo server most Node programs would write, for `deno task bench` to
// measure against: one socket piped back into itself (pipe() waits while the
// peer does not read, and ends the reply when the request ends).
//
// Usage: node bench/peers/node_echo.mjs PORT
import net from "node:net";

const server = net.createServer((socket) => {
  socket.setNoDelay(true);
  socket.on("error", () => socket.destroy()); // a reset ends this connection only
  socket.pipe(socket);
});
server.listen(Number(process.argv[2]), "127.0.0.1");
