// Command go_echo is the echo server most Go programs would write, for
// `deno task bench` to measure against: one goroutine per connection, io.Copy
// from the connection to itself, then a half-close.
//
//	go build -o bench/.bin/go_echo bench/peers/go_echo.go
//	bench/.bin/go_echo PORT
package main

import (
	"io"
	"net"
	"os"
)

func main() {
	listener, err := net.Listen("tcp", "127.0.0.1:"+os.Args[1])
	if err != nil {
		panic(err)
	}
	for {
		conn, err := listener.Accept()
		if err != nil {
			continue // out of descriptors, say: the next accept may work
		}
		go func(conn *net.TCPConn) {
			io.Copy(conn, conn) // a reset ends this connection only
			conn.CloseWrite()
			conn.Close()
		}(conn.(*net.TCPConn))
	}
}
