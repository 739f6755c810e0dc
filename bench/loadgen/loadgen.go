// Command loadgen drives an echo server and checks every byte it gets back.
//
// It is the lesson's Go client grown into a measuring tool: N connections, each
// its own goroutine, in one of five modes:
//
//	hello  the lesson's client: send one message, read its echo, close; the run
//	       ends when every connection has its echo back
//	rr     request-response: send a message, wait for its whole echo, again
//	bulk   stream: write 64 KiB chunks without waiting, read the echo as it comes
//	churn  connect, one round trip, close, again
//	idle   hold the connections open, then check that each still answers
//
// and prints one JSON document: operations per second, latency percentiles
// (nearest rank), Jain's fairness index over the connections, the least-served
// connection, timeouts and failures; with -server-pid, the CPU time the server
// used while the operations were counted. Every message differs by connection
// and by round, so a byte lost, doubled or sent to the wrong connection shows.
//
//	go build -o bench/.bin/loadgen ./bench/loadgen
//	bench/.bin/loadgen -port 8888 -mode rr -conns 1000 -size 5 -duration 3
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Schema names the shape of the JSON document; it changes when a field changes.
const Schema = "echo-loadgen/1"

// chunk is what bulk mode writes at a time.
const chunk = 64 * 1024

type options struct {
	host     string
	port     int
	mode     string
	conns    int
	size     int
	duration time.Duration
	warmup   time.Duration
	timeout  time.Duration
}

// window says whether an operation finishing now counts: after the warm-up, before the stop.
type window struct {
	counting atomic.Bool
	stopped  atomic.Bool
}

func (w *window) counts() bool { return w.counting.Load() && !w.stopped.Load() }

// conn is what one connection did.
type conn struct {
	ops       int       // round trips, connections (churn) or bytes (bulk) done in the window
	latencies []float64 // milliseconds, one per operation (not in bulk mode)
	err       error     // why it stopped early, if it did
}

// pattern fills b with the bytes message `round` of connection `id` carries,
// from stream offset `offset` on (bulk mode counts offsets across chunks).
func pattern(b []byte, id, round, offset int) {
	seed := id*7919 + round*31
	for i := range b {
		at := offset + i
		b[i] = byte(at*31 + seed + at>>8)
	}
}

func main() {
	o := options{}
	flag.StringVar(&o.host, "host", "127.0.0.1", "the server's address")
	flag.IntVar(&o.port, "port", 8888, "the server's port")
	flag.StringVar(&o.mode, "mode", "rr", "hello, rr, bulk, churn or idle")
	flag.IntVar(&o.conns, "conns", 20, "connections (workers in churn mode)")
	flag.IntVar(&o.size, "size", 5, "message size in bytes (rr, churn, idle)")
	seconds := flag.Float64("duration", 3, "seconds of load counted (idle: seconds held)")
	warmup := flag.Float64("warmup", 0.5, "seconds of load before the counting starts (rr, bulk, churn)")
	timeout := flag.Float64("timeout", 5, "seconds an operation may take before it counts as timed out")
	serverPid := flag.Int("server-pid", 0, "the server's process: report the CPU time it used while counting (Linux)")
	flag.Parse()
	o.duration = time.Duration(*seconds * float64(time.Second))
	o.timeout = time.Duration(*timeout * float64(time.Second))
	o.warmup = time.Duration(*warmup * float64(time.Second))
	if o.mode == "idle" || o.mode == "hello" {
		o.warmup = 0
	}
	if flag.NArg() > 0 || o.conns < 1 || o.size < 1 || o.duration <= 0 || o.timeout <= 0 || o.warmup < 0 {
		fmt.Fprintln(os.Stderr, "loadgen: -conns, -size, -duration and -timeout must be positive, and nothing else follows the flags")
		os.Exit(2)
	}
	// Each mode's work, on a connection opened before the clock starts (churn opens its own).
	work := map[string]func(*options, int, net.Conn, *window, *conn){
		"hello": hello, "rr": roundTrips, "bulk": stream, "churn": churn, "idle": idle,
	}[o.mode]
	if work == nil {
		fmt.Fprintf(os.Stderr, "loadgen: -mode must be hello, rr, bulk, churn or idle, got %q\n", o.mode)
		os.Exit(2)
	}
	cpu := func() float64 { return 0 } // the server's CPU seconds so far, if asked
	if *serverPid != 0 {
		if _, err := cpuSeconds(*serverPid); err != nil {
			fmt.Fprintf(os.Stderr, "loadgen: -server-pid %d: %v\n", *serverPid, err)
			os.Exit(2)
		}
		cpu = func() float64 { seconds, _ := cpuSeconds(*serverPid); return seconds }
	}
	results := make([]conn, o.conns)
	conns := make([]net.Conn, o.conns)
	var done sync.WaitGroup
	if o.mode != "churn" {
		for id := range conns {
			done.Add(1)
			go func(id int) {
				defer done.Done()
				conns[id], results[id].err = o.dial()
			}(id)
		}
		done.Wait()
	}
	var w window
	w.counting.Store(o.warmup == 0)
	start, cpuAtStart := time.Now(), cpu()
	for id := range results {
		if results[id].err != nil {
			continue // could not connect
		}
		done.Add(1)
		go func(id int) {
			defer done.Done()
			work(&o, id, conns[id], &w, &results[id])
		}(id)
	}
	var elapsed time.Duration
	var serverCPU float64
	if o.mode == "hello" { // it runs until every connection has its echo
		done.Wait()
		elapsed, serverCPU = time.Since(start), cpu()-cpuAtStart
	} else {
		time.Sleep(o.warmup) // the server accepts, its caches and JIT warm up
		w.counting.Store(true)
		start, cpuAtStart = time.Now(), cpu()
		time.Sleep(o.duration)
		w.stopped.Store(true)
		elapsed, serverCPU = time.Since(start), cpu()-cpuAtStart
		done.Wait()
	}
	report := summarize(&o, results, elapsed)
	report.Summary.ServerCPUSeconds = round(serverCPU, 3)
	out, _ := json.MarshalIndent(report, "", "  ")
	fmt.Println(string(out))
	if report.Summary.Failed > 0 {
		os.Exit(1)
	}
}

func (o *options) dial() (net.Conn, error) {
	return net.DialTimeout("tcp", net.JoinHostPort(o.host, strconv.Itoa(o.port)), o.timeout)
}

// roundTrip sends message `round` and reads its echo; the latency is in milliseconds.
func roundTrip(o *options, c net.Conn, id, round int, sent, got []byte) (float64, error) {
	pattern(sent, id, round, 0)
	began := time.Now()
	c.SetDeadline(began.Add(o.timeout))
	if _, err := c.Write(sent); err != nil {
		return 0, err
	}
	if _, err := io.ReadFull(c, got); err != nil {
		return 0, err
	}
	if !bytes.Equal(sent, got) {
		return 0, fmt.Errorf("wrong bytes echoed in round %d", round)
	}
	return float64(time.Since(began).Microseconds()) / 1000, nil
}

func roundTrips(o *options, id int, c net.Conn, w *window, r *conn) {
	defer c.Close()
	sent, got := make([]byte, o.size), make([]byte, o.size)
	for round := 0; !w.stopped.Load(); round++ {
		ms, err := roundTrip(o, c, id, round, sent, got)
		if err != nil {
			r.err = err
			return
		}
		if w.counts() { // completed in the window
			r.ops++
			r.latencies = append(r.latencies, ms)
		}
	}
}

func churn(o *options, id int, _ net.Conn, w *window, r *conn) {
	sent, got := make([]byte, o.size), make([]byte, o.size)
	for round := 0; !w.stopped.Load(); round++ {
		began := time.Now()
		c, err := o.dial()
		if err != nil {
			r.err = err
			return
		}
		_, err = roundTrip(o, c, id, round, sent, got)
		c.Close()
		if err != nil {
			r.err = err
			return
		}
		if w.counts() {
			r.ops++
			r.latencies = append(r.latencies, float64(time.Since(began).Microseconds())/1000)
		}
	}
}

// stream writes until told to stop, half-closes, and checks the echo to its end.
func stream(o *options, id int, c net.Conn, w *window, r *conn) {
	defer c.Close()
	tcp := c.(*net.TCPConn)
	written := make(chan int, 1)
	go func() {
		out := make([]byte, chunk)
		offset := 0
		for !w.stopped.Load() {
			pattern(out, id, 0, offset)
			c.SetWriteDeadline(time.Now().Add(o.timeout))
			n, err := c.Write(out)
			offset += n
			if err != nil {
				break
			}
		}
		tcp.CloseWrite()
		written <- offset
	}()
	in, want := make([]byte, chunk), make([]byte, chunk)
	offset := 0
	for {
		c.SetReadDeadline(time.Now().Add(o.timeout))
		n, err := c.Read(in)
		if n > 0 {
			pattern(want[:n], id, 0, offset)
			if !bytes.Equal(in[:n], want[:n]) {
				r.err = fmt.Errorf("wrong bytes echoed at offset %d", offset)
				return
			}
			offset += n
			if w.counts() {
				r.ops += n
			}
		}
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			r.err = err
			return
		}
	}
	if sent := <-written; offset != sent {
		r.err = fmt.Errorf("%d bytes echoed of %d sent", offset, sent)
	}
}

// hello is the lesson's client: one message, its echo, and goodbye.
func hello(o *options, id int, c net.Conn, _ *window, r *conn) {
	defer c.Close()
	ms, err := roundTrip(o, c, id, 0, make([]byte, o.size), make([]byte, o.size))
	if err != nil {
		r.err = err
		return
	}
	r.ops = 1
	r.latencies = append(r.latencies, ms)
}

// idle holds its connection until told to stop, then checks that it still answers.
func idle(o *options, id int, c net.Conn, w *window, r *conn) {
	for !w.stopped.Load() {
		time.Sleep(10 * time.Millisecond)
	}
	hello(o, id, c, w, r)
}

// Report is the JSON document loadgen prints.
type Report struct {
	Schema  string `json:"schema"`
	Server  Server `json:"server"`
	Load    Load   `json:"load"`
	Summary Sum    `json:"summary"`
}

// Server is where the load went.
type Server struct {
	Host string `json:"host"`
	Port int    `json:"port"`
}

// Load is what was asked.
type Load struct {
	Mode        string  `json:"mode"`
	Connections int     `json:"connections"`
	Size        int     `json:"size"`
	Seconds     float64 `json:"seconds"`
}

// Sum is what was measured.
type Sum struct {
	Ops            int                `json:"ops"`
	Unit           string             `json:"unit"`
	PerSecond      float64            `json:"perSecond"`
	BytesPerSecond float64            `json:"bytesPerSecond"`
	Failed         int                `json:"failed"`
	Timeouts       int                `json:"timeouts"`
	Ms             map[string]float64 `json:"ms"`
	Jain           float64            `json:"jain"`
	Worst          float64            `json:"worst"`
	Error          string             `json:"error,omitempty"`
	// CPU seconds (user and system, all threads) the -server-pid process used while counting.
	ServerCPUSeconds float64 `json:"serverCpuSeconds,omitempty"`
}

func summarize(o *options, results []conn, elapsed time.Duration) Report {
	sum := Sum{Unit: map[string]string{"hello": "round trips", "rr": "round trips", "bulk": "bytes", "churn": "connections", "idle": "round trips"}[o.mode]}
	var latencies []float64
	shares := make([]float64, len(results))
	for i, r := range results {
		sum.Ops += r.ops
		shares[i] = float64(r.ops)
		latencies = append(latencies, r.latencies...)
		if r.err != nil {
			sum.Failed++
			var timeout net.Error
			if errors.As(r.err, &timeout) && timeout.Timeout() {
				sum.Timeouts++
			}
			if sum.Error == "" {
				sum.Error = r.err.Error()
			}
		}
	}
	seconds := elapsed.Seconds()
	sum.PerSecond = round(float64(sum.Ops)/seconds, 1)
	bytesPerOp := float64(2 * o.size) // sent and echoed
	if o.mode == "bulk" {
		bytesPerOp = 1 // ops are bytes echoed
	}
	sum.BytesPerSecond = round(float64(sum.Ops)*bytesPerOp/seconds, 0)
	sum.Ms = percentiles(latencies)
	sum.Jain, sum.Worst = fairness(shares)
	return Report{
		Schema:  Schema,
		Server:  Server{Host: o.host, Port: o.port},
		Load:    Load{Mode: o.mode, Connections: o.conns, Size: o.size, Seconds: round(elapsed.Seconds(), 3)},
		Summary: sum,
	}
}

// cpuSeconds is a process's CPU time so far, user and system, all its threads, from /proc.
func cpuSeconds(pid int) (float64, error) {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The fields after the command name, which is in parentheses and may hold spaces:
	// utime and stime, the 14th and 15th of the line, are the 12th and 13th of these.
	fields := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+1:]))
	if len(fields) < 13 {
		return 0, fmt.Errorf("unexpected /proc/%d/stat", pid)
	}
	utime, err1 := strconv.ParseFloat(fields[11], 64)
	stime, err2 := strconv.ParseFloat(fields[12], 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("unexpected /proc/%d/stat", pid)
	}
	return (utime + stime) / 100, nil // in clock ticks, 100 a second on Linux (USER_HZ)
}

// percentiles by nearest rank: the smallest latency at or above that share of all.
func percentiles(ms []float64) map[string]float64 {
	figures := map[string]float64{}
	if len(ms) == 0 {
		return figures
	}
	sort.Float64s(ms)
	for name, share := range map[string]float64{"min": 0, "p50": 0.5, "p99": 0.99, "p999": 0.999, "max": 1} {
		i := int(math.Ceil(share*float64(len(ms)))) - 1
		if i < 0 {
			i = 0
		}
		figures[name] = round(ms[i], 3)
	}
	return figures
}

// fairness: Jain's index of the shares, (Σx)² / (n·Σx²), 1 when all are equal;
// and the least share relative to the mean.
func fairness(shares []float64) (float64, float64) {
	var sum, squares, least float64 = 0, 0, math.Inf(1)
	for _, x := range shares {
		sum += x
		squares += x * x
		least = math.Min(least, x)
	}
	if squares == 0 {
		return 0, 0
	}
	return round(sum*sum/(float64(len(shares))*squares), 4), round(least/(sum/float64(len(shares))), 4)
}

func round(x float64, digits int) float64 {
	scale := math.Pow(10, float64(digits))
	return math.Round(x*scale) / scale
}
