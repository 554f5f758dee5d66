"""The Redis backend's Lua scripts, and the key layout they share.

Every change to a partition is one atomic script. The scripts are package files
(`lua_scripts/*.lua`), read once at import; each runs as `PRELUDE + SCRIPT` (`prelude.lua`
has the functions they share).

Keys of partition P in store namespace NS share the prefix `NS:{P}` (ARGV[1]; the braces
make it one Redis Cluster hash slot):

    :meta            HASH   schema, capacity, stale policy, counters, sealed, live rows, mask<j>
    :bits  :cons     HASH   field -> bit, consumer -> bit
    :rows            HASH   row -> msgpack [group, group_size, length, version, ready, versioned,
                            0, nbytes, then chunk, offset, length for each field] (ready /
                            versioned: field bits; chunk, offset, length: where the field's cell
                            is, chunk '' if none). A get hands the client these blobs as they
                            are, and the client reads what it needs from them
    :refs            HASH   row -> its ready bits and the chunks of its cells, as one short string
                            (`refkey`): what freeing the row needs, without unpacking its metadata
    :acked           HASH   '<j>:<block>' -> 8 bytes, bit i set once consumer j is done with row
                            64 * block + i (acked it, or dropped it as stale): an ack reads and
                            writes one short string per block of rows instead of an entry per
                            row (a get's script with four consumers: 0.915x of its time with
                            per-row entries). Only with several consumers: one consumer's ack frees
                            the row, so a partition with one never writes it
    :blive           HASH   block -> its live rows (only with several consumers): a block's
                            bitmaps go with its last live row
    :x:<chunk>:<b>   STRING the cells (`dataplane.redis.cells`) of field b of one put, back to
                            back: written by a plain SET in the same MULTI/EXEC as the put's
                            script, read by plain GETRANGEs after the get's script, one per run
                            of adjacent cells (a whole get is mostly one per field; a hash of
                            cells cost the client twice as much to ask for and parse); cell
                            bytes never pass through Lua (copying them in and out of Lua costs
                            50x the write itself), and a read lands straight in the buffers
                            the batch's arrays are views of (`dataplane.redis.wire`)
    :xc              HASH   "<chunk>:<b>" -> rows still referring to that chunk's cells: a chunk is
                            deleted whole when its last row lets go (one DEL instead of a HDEL
                            per cell, which was a fifth of a get's server time)
    :missing         HASH   field bit -> live rows that lack that field: a consumer whose fields no
                            row lacks has all its waiting rows ready, without reading any row's
                            metadata
    :ver             ZSET   row by policy version, so a version window finds stale rows in O(log n)
    :c<j>:ready      ZSET   rows consumer j waits for (neither handed out nor finished) whose
                            fields it asks for are written, by row number: a sequential get takes
                            the first ones with one ZRANGE and one ZREMRANGEBYRANK
    :c<j>:pend       ZSET   the rows consumer j waits for that are not ready yet; a row j waits for
                            is in exactly one of the two, so a put of whole rows writes one entry
                            per row and consumer, and a get removes them by rank
    :c<j>:lease      ZSET   lease id -> deadline (server ms); a lease is one handed-out batch, its
                            id '<client id>/<n>'; :c<j>:lrows HASH lease id -> the rows it still
                            holds, comma-separated (a lease per batch, not per row: per-row lease
                            entries were a third of a get's server time)
    :c<j>:n          HASH   counters (delivered, acked, redelivered, ...)
    :alive           ZSET   client id by the deadline of its heartbeat
    :ev  :space      STREAM one entry (MAXLEN 1): appended when rows become ready / capacity
                            frees while a client waits for that (meta watch_ev / watch_space), so
                            a waiting client blocks in XREAD from the id it last saw
    :puts  :putrow    ZSET   ids of finished puts (10 min, at most 10000) / HASH id -> first row, so
                            a put retried after a lost reply is not stored twice

A put's chunk keys carry a TTL until its script accepts them (PERSIST), so a put whose
script refused it, or whose client died between the two, leaves nothing behind.

Scripts answer {"ok", ...}, {"err", kind, detail...} or a waiting state; the client turns
errors into the exception tree with full messages. Knows nothing about Python objects.
"""

from __future__ import annotations

from importlib.resources import files

_HERE = files("dataplane.redis") / "lua_scripts"
NAMES = ("CREATE", "REGISTER", "PUT_NEW", "PUT_FILL", "GET", "ACK", "LEASES", "ALIVE", "SEAL", "DROP",
         "SNAPSHOT", "RESTORE")  # fmt: skip


def _read(name: str) -> str:
    return (_HERE / f"{name.lower()}.lua").read_text()


PRELUDE = _read("prelude")
SCRIPTS = {name: PRELUDE + _read(name) for name in NAMES}
